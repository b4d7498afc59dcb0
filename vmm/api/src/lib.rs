//! Carrel's gRPC API, package `carrel.v1` (`proto/carrel/v1/carrel.proto`): the message
//! types, the service traits carreld implements and the clients the CLI uses.

#![allow(clippy::all, missing_debug_implementations)]

pub mod v1 {
    tonic::include_proto!("carrel.v1");
}

/// The encoded descriptors of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/carrel_descriptor.bin"));

/// A channel to carreld on its Unix socket, as every Rust client connects (the URI is
/// a placeholder: the connector dials the socket).
pub async fn connect(socket: &std::path::Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://carreld")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
