//! Store operations, one module per command: they read and write the store only
//! through [`crate::store::Store`] and the back-end trait.

pub mod backup;
pub mod changed;
pub mod commit;
pub mod gc;
pub mod info;
pub mod restore;
pub mod verify;
