//! Generates the agent protocol (protos/*.proto) with ttrpc-codegen: pure Rust, no system protoc.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: [&str; 4] = [
    "protos/agent.proto",
    "protos/health.proto",
    "protos/oci.proto",
    "protos/types.proto",
];

fn main() {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("protocols");
    std::fs::create_dir_all(&out_dir).expect("create OUT_DIR/protocols");

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generate the agent protocol from protos/");

    // The generated files start with inner attributes (`#![...]`, `//!`) that `include!` rejects.
    for entry in std::fs::read_dir(&out_dir).expect("read OUT_DIR/protocols") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: String = text
            .lines()
            .filter(|line| !line.starts_with("#![") && !line.starts_with("//!"))
            .map(|line| format!("{line}\n"))
            .collect();
        std::fs::write(&path, kept).expect("write generated file");
    }
}
