//! The `livemount` binary: see [`livemount::cli`].

fn main() -> std::process::ExitCode {
    livemount::cli::main()
}
