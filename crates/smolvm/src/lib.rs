//! smolvm host library: sandboxes that are real microVMs. Behaviour lives here; the CLI and the
//! Python package are thin layers over it.

pub mod bench;
pub mod busybox;
pub mod config;
pub mod conn;
pub mod cpio;
pub mod doctor;
pub mod env;
pub mod error;
pub mod image;
pub mod net;
pub mod recipe;
pub mod rootless;
pub mod sandbox;
pub mod snapshot_files;
pub mod ssh;
pub mod store;
pub mod supervisor;
pub mod vmm;
pub mod warm;

pub use config::{Dirs, VmConfig};
pub use error::{Error, Result};
pub use sandbox::{CommandResult, Output, RunOptions, Sandbox, Terminal};
pub use smolvm_proto::env::validate_key as validate_env_key;
pub use smolvm_proto::{Shell, TtySize};
pub use store::State;
