//! Block-access profiles (format shared by `livemount-profiler` and the driver).
