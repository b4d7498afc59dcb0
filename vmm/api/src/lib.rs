//! Carrel's gRPC API, package `carrel.v1` (`proto/carrel/v1/carrel.proto`): the message
//! types, the service traits carreld implements and the clients the CLI uses.

#![allow(clippy::all, missing_debug_implementations)]

pub mod v1 {
    tonic::include_proto!("carrel.v1");
}

/// The encoded descriptors of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/carrel_descriptor.bin"));
