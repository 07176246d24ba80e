"""grpcio (the C-core gRPC stack) against a chargegate server over TLS: health without a
credential, Authorize with a bearer token or a client certificate, refusals without one, and
plaintext against the TLS port. Prints one JSON object; the Rust test reads it.

Usage: grpcio_tls.py ADDR CA_PEM STATION DRIVER_TOKEN [--token T] [--cert C --key K]
"""

import argparse
import json

import grpc


def field(number, text):
    data = text.encode()
    return bytes([(number << 3) | 2, len(data)]) + data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("ca")
    p.add_argument("station")
    p.add_argument("driver_token")
    p.add_argument("--token")
    p.add_argument("--cert")
    p.add_argument("--key")
    a = p.parse_args()
    ca = open(a.ca, "rb").read()
    cert = open(a.cert, "rb").read() if a.cert else None
    key = open(a.key, "rb").read() if a.key else None
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", "localhost")]
    out = {}
    with grpc.secure_channel(a.addr, creds, options=options) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        out["health"] = check(b"", timeout=10).hex()
        authorize = channel.unary_unary("/chargegate.v1.ChargingAuthorization/Authorize")
        request = field(1, a.station) + field(2, a.driver_token)
        metadata = [("authorization", "Bearer " + a.token)] if a.token else []
        try:
            answer = authorize(request, metadata=metadata, timeout=10)
            out["authorize"] = "OK"
            out["answer_bytes"] = len(answer)
        except grpc.RpcError as e:
            out["authorize"] = e.code().name
        try:
            authorize(request, metadata=[("authorization", "Bearer not-a-known-token-0000")], timeout=10)
            out["wrong_token"] = "OK"
        except grpc.RpcError as e:
            out["wrong_token"] = e.code().name
    with grpc.insecure_channel(a.addr) as plain:
        try:
            plain.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
            out["plaintext"] = "OK"
        except grpc.RpcError as e:
            out["plaintext"] = e.code().name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
