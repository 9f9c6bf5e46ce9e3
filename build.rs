//! Compiles `proto/` without a system `protoc`: protox parses the files into a
//! descriptor set, tonic-prost-build generates messages and gRPC stubs from it,
//! and the encoded set is written to `OUT_DIR` for reflection and proto3 JSON.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/agentmesh/v1/envelope.proto",
    "proto/agentmesh/v1/agent.proto",
    "proto/agentmesh/v1/discovery.proto",
    "proto/agentmesh/v1/queue.proto",
    "proto/agentmesh/v1/fanout.proto",
    "proto/agentmesh/v1/trace.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("agentmesh_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let mut config = tonic_prost_build::Config::new();
    // `prost::Name` lets the JSON mapping find each message's descriptor.
    config.enable_type_names();
    // Queue frames travel through several stream layers by value, once per message; with the
    // envelope inline they are 450-520 bytes, and moving them dominated the node's profile.
    for field in [
        ".agentmesh.v1.SubmitRequest.envelope",
        ".agentmesh.v1.Delivery.envelope",
        ".agentmesh.v1.ConsumeAck.result",
    ] {
        config.boxed(field);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
