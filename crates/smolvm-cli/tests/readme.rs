//! The README's Rust library example is `examples/library.rs`, word for word, and it runs: a
//! user who copies it gets a program that works.

mod common;

use common::*;

/// The README's code block under "The Rust library".
fn readme_example() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = &readme[readme.find("## The Rust library").expect("the README has its Rust section")..];
    let start = section.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let end = start + section[start..].find("```\n").expect("the block ends");
    section[start..end].to_string()
}

#[test]
fn the_readme_library_example_is_the_compiled_one_and_runs() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/library.rs")).unwrap();
    let code = example.split_once("\n\n").map(|(_header, code)| code).unwrap_or_default();
    assert_eq!(code, readme_example(), "README.md's Rust example and examples/library.rs differ");

    // Built beside the CLI by `cargo test --workspace` (as `make test` runs it), which builds
    // every package's examples.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_smolvm")).with_file_name("examples").join("library");
    assert!(bin.exists(), "{} is not built: run `cargo build -p smolvm-cli --example library`", bin.display());
    let env = env();
    let out = std::process::Command::new(&bin)
        .env("SMOLVM_DATA_DIR", &env.dirs.data)
        .env("SMOLVM_IMAGE_DIR", &env.dirs.images)
        .env("SMOLVM_BIN", env!("CARGO_BIN_EXE_smolvm"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // It deletes what it made.
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}
