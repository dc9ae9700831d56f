//! One real S3 server for a test, of the engine the run asks for: Garage (the
//! reference, [`crate::garage`]) or Ceph's radosgw ([`crate::rgw`]), chosen by
//! `LIVEMOUNT_S3_ENGINE` (`garage`, the default, or `rgw`). `cargo xtask test` runs
//! the S3 tests once against each, so what the store asks of S3 is checked on two
//! independent implementations.

use crate::garage::{garage_bin, Garage};
use crate::rgw::Rgw;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable that selects the engine.
pub const ENGINE_ENV: &str = "LIVEMOUNT_S3_ENGINE";

/// An S3 engine the tests can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Garage, built by `cargo xtask setup` into `.cache/tools`.
    Garage,
    /// Ceph's radosgw, from Debian's packages.
    Rgw,
}

impl Engine {
    /// The engine `LIVEMOUNT_S3_ENGINE` names (Garage when unset); an unknown name
    /// panics (a typo must not silently test the other engine).
    pub fn from_env() -> Engine {
        match std::env::var(ENGINE_ENV).as_deref() {
            Err(_) | Ok("") | Ok("garage") => Engine::Garage,
            Ok("rgw") => Engine::Rgw,
            Ok(other) => panic!("{ENGINE_ENV}={other}: want garage or rgw"),
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Garage => "garage",
            Engine::Rgw => "rgw",
        }
    }

    /// Why this engine cannot start here (what to install), if it cannot.
    pub fn missing(self) -> Option<&'static str> {
        match self {
            Engine::Garage if garage_bin().is_none() => {
                Some("no garage binary: run `cargo xtask setup` (it builds Garage into .cache/tools)")
            }
            Engine::Rgw if !crate::rgw::available() => {
                Some("no radosgw: run `cargo xtask setup` (it installs Debian's ceph-mon, ceph-osd, radosgw)")
            }
            _ => None,
        }
    }
}

enum Inner {
    Garage(Garage),
    Rgw(Rgw),
}

/// A running S3 server with one access key.
pub struct S3Server {
    inner: Inner,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key id.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

impl S3Server {
    /// Start a server of `engine`. Panics with its logs if it does not come up.
    pub fn start(engine: Engine) -> S3Server {
        match engine {
            Engine::Garage => {
                let bin = garage_bin().expect("no garage binary");
                Garage::start(&bin).into()
            }
            Engine::Rgw => {
                let r = Rgw::start();
                S3Server {
                    endpoint: r.endpoint.clone(),
                    key_id: r.key_id.clone(),
                    secret: r.secret.clone(),
                    inner: Inner::Rgw(r),
                }
            }
        }
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        match self.inner {
            Inner::Garage(_) => Engine::Garage,
            Inner::Rgw(_) => Engine::Rgw,
        }
    }

    /// The region to sign requests with.
    pub fn region(&self) -> &'static str {
        match self.inner {
            Inner::Garage(_) => crate::garage::REGION,
            Inner::Rgw(_) => crate::rgw::REGION,
        }
    }

    /// The domain under which `BUCKET.DOMAIN` addresses a bucket virtual-host style.
    pub fn vhost_domain(&self) -> &'static str {
        match self.inner {
            Inner::Garage(_) => crate::garage::VHOST_DOMAIN,
            Inner::Rgw(_) => crate::rgw::VHOST_DOMAIN,
        }
    }

    /// Create `bucket`, writable with the key.
    pub fn bucket(&self, bucket: &str) {
        match &self.inner {
            Inner::Garage(g) => g.bucket(bucket),
            Inner::Rgw(r) => r.bucket(bucket),
        }
    }

    /// Take the S3 service away (its data stays).
    pub fn kill(&mut self) {
        match &mut self.inner {
            Inner::Garage(g) => g.kill(),
            Inner::Rgw(r) => r.kill(),
        }
    }

    /// Bring it back on the same port and data.
    pub fn restart(&mut self) {
        match &mut self.inner {
            Inner::Garage(g) => g.restart(),
            Inner::Rgw(r) => r.restart(),
        }
    }

    /// The server's logs so far.
    pub fn log(&self) -> String {
        match &self.inner {
            Inner::Garage(g) => g.log(),
            Inner::Rgw(r) => r.log(),
        }
    }

    /// A 0600 credentials file (AWS INI format) holding the key.
    pub fn credentials_file(&self) -> PathBuf {
        match &self.inner {
            Inner::Garage(g) => g.credentials_file(),
            Inner::Rgw(r) => {
                write_credentials(&r.dir().join("credentials"), &self.key_id, &self.secret)
            }
        }
    }

    /// The environment a livemount command needs for this server.
    pub fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        s3_env(c, &self.endpoint, self.region(), &self.key_id, &self.secret)
    }
}

impl From<Garage> for S3Server {
    fn from(g: Garage) -> S3Server {
        S3Server {
            endpoint: g.endpoint.clone(),
            key_id: g.key_id.clone(),
            secret: g.secret.clone(),
            inner: Inner::Garage(g),
        }
    }
}

/// Write a 0600 AWS INI credentials file at `path` holding one key; its path.
pub fn write_credentials(path: &Path, key_id: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("credentials file");
    std::io::Write::write_all(
        &mut f,
        format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
            .as_bytes(),
    )
    .expect("write credentials");
    path.to_path_buf()
}

/// Point a livemount command at an S3 server: endpoint, region and key in the
/// environment, nothing inherited that could name another.
pub fn s3_env<'a>(
    c: &'a mut Command,
    endpoint: &str,
    region: &str,
    key_id: &str,
    secret: &str,
) -> &'a mut Command {
    c.env("AWS_ACCESS_KEY_ID", key_id)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("LIVEMOUNT_S3_ENDPOINT", endpoint)
        .env("LIVEMOUNT_S3_REGION", region)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
}
