//! On-disk formats: chunk files, snapshot indexes and access profiles. Each parser
//! treats its input as untrusted and checks sizes before it allocates.

pub mod chunk;
pub mod index;
pub mod profile;
