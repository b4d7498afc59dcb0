"""A gRPC client that is not Carrel's: Python grpcio with server reflection only (no .proto,
no generated code). Calls Host.Info, Vms.List and Screen.Screenshot on carreld and decodes
the PNG it gets. Prints one JSON object.

    python3 generic_client.py SOCKET VM_NAME
"""
import json
import struct
import sys
import zlib

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def decode_png(data):
    """Width, height and the length check of the decompressed pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat, width, height, colour = 8, b"", 0, 0, 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8, depth
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    channels = {2: 3, 6: 4}[colour]
    rows = zlib.decompress(idat)
    assert len(rows) == height * (1 + width * channels), "pixel data does not fill the image"
    return width, height


def main():
    socket, name = sys.argv[1], sys.argv[2]
    # grpcio would send the socket path as the HTTP/2 authority, which is not a valid one.
    channel = grpc.insecure_channel("unix://" + socket, options=[("grpc.default_authority", "localhost")])
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def call(service, method, **fields):
        descriptor = pool.FindServiceByName(service).FindMethodByName(method)
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        stub = channel.unary_unary(
            "/%s/%s" % (service, method),
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return stub(request_class(**fields), timeout=30)

    info = call("carrel.v1.Host", "Info")
    names = [vm.name for vm in call("carrel.v1.Vms", "List").vms]
    shot = call("carrel.v1.Screen", "Screenshot", name=name, still_ms=200, timeout_ms=10000)
    width, height = decode_png(shot.image)
    print(json.dumps({
        "platform": info.platform,
        "vms": names,
        "png": [width, height],
        "reported": [shot.width, shot.height],
        "info": json_format.MessageToDict(info),
    }))


main()
