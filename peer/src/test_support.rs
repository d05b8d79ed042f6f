//! Helpers shared by the unit tests of several modules.
//!
//! Why a module: the tests of `access`, `files` and `disk_writer` each need a fresh directory
//! of their own, and one function makes it the same way for all of them.

use std::path::PathBuf;

/// A new directory under the system's temporary directory, unique to this process and call
/// (`peer-test-TAG-PID-RANDOM`); the test removes it when done.
pub(crate) fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "peer-test-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("creating a test directory");
    dir
}
