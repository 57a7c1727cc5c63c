#!/usr/bin/python3
"""A socktap client on another gRPC stack: Python's grpcio (gRPC's C core).

It knows nothing of socktap's .proto. As grpcurl does, it asks the server's
reflection service for the file that defines socktap.v1.Socktap, then for
each file that one imports, builds the message types from those
descriptors, and then:
  1. checks health (grpc.health.v1.Health/Check: SERVING);
  2. calls GetStatus;
  3. watches one TCP connection of its own by cookie (SO_COOKIE), sends
     known sizes on it, and checks that the events carry that cookie and
     exactly those sizes, sends and receives;
  4. sends a request with a malformed CIDR and checks INVALID_ARGUMENT
     naming the field.
Both reflection versions are asked (v1alpha, which grpcurl 1.8 speaks, and
v1). Any failure exits non-zero with a one-line reason on stderr.

With --tls CA CERT KEY it connects over TLS, trusting CA and presenting
CERT and KEY, and first checks that a client without a certificate is
refused (socktapd with --tls-client-ca). With --token-file FILE it sends
that bearer token with the Socktap calls, and first checks that a call
without it is refused UNAUTHENTICATED, while health and reflection stay
open without it.

With --json-lines FILE [--message NAME] it checks instead that each line
of FILE (what `socktap watch -o json` printed; NAME, by default
socktap.v1.Event, names the message the lines are) is proto3 JSON as
protobuf's own implementation reads and writes it: parsed strictly (no
unknown field, every value of its field's JSON type), then printed again
with every field, zeros included, it is the same object.

Usage: grpc_core_client.py ADDRESS [--tls CA CERT KEY] [--token-file FILE]
       grpc_core_client.py ADDRESS --json-lines FILE [--message NAME]
ADDRESS: host:port, or unix:/path.
"""

import argparse

import json
import socket
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

SO_COOKIE = 57  # <asm-generic/socket.h>
REFLECTION = (
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
SIZES = [100, 2000, 37, 65536, 1]


def fail(why):
    sys.stderr.write(f"grpc_core_client: {why}\n")
    sys.exit(1)


# --- protobuf wire format, for the few reflection and health messages ----


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def string_field(field, value):
    data = value.encode() if isinstance(value, str) else value
    return varint(field << 3 | 2) + varint(len(data)) + data


def read_varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def fields(buf):
    """(field number, value) of each field: bytes when length-delimited,
    an int for a varint."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            fail(f"wire type {wire} in a reflection response")
        yield field, value


# --- reflection -----------------------------------------------------------


def reflect(channel, method, requests):
    """Sends the encoded requests on one ServerReflectionInfo stream and
    returns the encoded responses."""
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    return list(call(iter(requests), timeout=10))


def list_services(channel, method):
    # ServerReflectionRequest.list_services = 7
    (resp,) = reflect(channel, method, [string_field(7, "")])
    names = []
    for field, value in fields(resp):
        if field == 7:  # error_response
            fail(f"{method}: list_services: error {value!r}")
        if field == 6:  # list_services_response { repeated ServiceResponse service = 1 }
            for f, service in fields(value):
                if f == 1:
                    names += [v.decode() for n, v in fields(service) if n == 1]
    return names


def file_descriptors(resp, what):
    out = []
    for field, value in fields(resp):
        if field == 7:
            fail(f"reflection: {what}: error {value!r}")
        if field == 4:  # file_descriptor_response { repeated bytes file_descriptor_proto = 1 }
            out += [v for n, v in fields(value) if n == 1]
    if not out:
        fail(f"reflection: {what}: no file descriptor in the response")
    return out


def descriptors_for(channel, method, symbol):
    """Every file needed for `symbol`: the one defining it, then each import
    the server did not send with it, asked by file name (as grpcurl does)."""
    files = {}

    def add(encoded):
        fd = descriptor_pb2.FileDescriptorProto.FromString(encoded)
        files.setdefault(fd.name, fd)

    # ServerReflectionRequest.file_containing_symbol = 4, file_by_filename = 3
    (resp,) = reflect(channel, method, [string_field(4, symbol)])
    for encoded in file_descriptors(resp, f"file_containing_symbol {symbol}"):
        add(encoded)
    while True:
        missing = sorted({dep for fd in files.values() for dep in fd.dependency} - files.keys())
        if not missing:
            return files
        for name in missing:
            (resp,) = reflect(channel, method, [string_field(3, name)])
            for encoded in file_descriptors(resp, f"file_by_filename {name}"):
                add(encoded)


def pool_of(files):
    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add(name):
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


def message_class(pool, name):
    desc = pool.FindMessageTypeByName(name)
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


# --- the checks -------------------------------------------------------------


def with_every_field(message):
    """The message as a JSON object, every field printed, zeros included
    (grpcurl's -emit-defaults)."""
    try:
        return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf before 5.26
        return json_format.MessageToDict(message, including_default_value_fields=True)


def check_json_lines(pool, path, message):
    event_class = message_class(pool, message)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line]
    if not lines:
        fail(f"{path}: no JSON lines")
    for n, line in enumerate(lines, 1):
        try:
            event = json_format.Parse(line, event_class())
        except json_format.ParseError as e:
            fail(f"{path}:{n}: not proto3 JSON of {message}: {e}: {line}")
        printed, read = with_every_field(event), json.loads(line)
        if printed != read:
            diff = {k: (read.get(k), printed.get(k)) for k in read.keys() | printed.keys() if read.get(k) != printed.get(k)}
            fail(f"{path}:{n}: differs from protobuf's own printing (line, protobuf): {diff}")
    print(f"JSON lines: {len(lines)} lines of {path} are proto3 JSON of {message}, every field printed")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def connect(args):
    """The channel to socktapd; with --tls, checks then that a client that
    trusts the same CA but has no certificate gets no answer."""
    if not args.tls:
        channel = grpc.insecure_channel(args.address)
        grpc.channel_ready_future(channel).result(timeout=10)
        return channel
    ca, cert, key = (read(p) for p in args.tls)
    # The server's certificate names localhost and 127.0.0.1.
    options = [("grpc.ssl_target_name_override", "localhost")]
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(args.address, creds, options)
    grpc.channel_ready_future(channel).result(timeout=10)
    anonymous = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca), options)
    health = anonymous.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
    try:
        health(b"", timeout=10)
        fail("a client without a certificate was answered")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            fail(f"a client without a certificate: {e.code()} {e.details()!r}, not UNAVAILABLE")
        print(f"TLS: a client without a certificate is refused ({e.code().name})")
    anonymous.close()
    return channel


def main():
    parser = argparse.ArgumentParser(description="socktap through grpcio, from reflection alone")
    parser.add_argument("address")
    parser.add_argument("--tls", nargs=3, metavar=("CA", "CERT", "KEY"))
    parser.add_argument("--token-file")
    parser.add_argument("--json-lines", metavar="FILE")
    parser.add_argument("--message", default="socktap.v1.Event")
    args = parser.parse_args()
    channel = connect(args)
    if args.json_lines:
        files = descriptors_for(channel, REFLECTION[0], "socktap.v1.Socktap")
        check_json_lines(pool_of(files), args.json_lines, args.message)
        print("grpc_core_client: ok")
        return
    metadata = None
    if args.token_file:
        metadata = [("authorization", "Bearer " + read(args.token_file).decode().strip())]

    pools = []
    for method in REFLECTION:
        services = list_services(channel, method)
        for want in ("socktap.v1.Socktap", "grpc.health.v1.Health"):
            if want not in services:
                fail(f"{method}: {want} not listed: {services}")
        # Every service listed can be described (grpcurl describe), its
        # imports included.
        for service in services:
            pool_of(descriptors_for(channel, method, service)).FindServiceByName(service)
        files = descriptors_for(channel, method, "socktap.v1.Socktap")
        pools.append(pool_of(files))
        print(f"{method.split('/')[1]}: services {', '.join(services)}; socktap.v1.Socktap from {', '.join(sorted(files))}")
    pool = pools[0]

    # grpc.health.v1.Health/Check with an empty HealthCheckRequest; the
    # response's status (field 1) is 1, SERVING.
    health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
    status = dict(fields(health(b"", timeout=10)))
    if status.get(1) != 1:
        fail(f"health: status {status.get(1)}, not SERVING (1)")

    service = pool.FindServiceByName("socktap.v1.Socktap")

    def method(name, streaming):
        m = service.methods_by_name[name]
        req, resp = message_class(pool, m.input_type.full_name), message_class(pool, m.output_type.full_name)
        path = f"/{service.full_name}/{name}"
        make = channel.unary_stream if streaming else channel.unary_unary
        return req, make(path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString)

    status_req, get_status = method("GetStatus", False)
    if metadata:
        try:
            get_status(status_req(), timeout=10)
            fail("GetStatus without the token was answered")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                fail(f"GetStatus without the token: {e.code()} {e.details()!r}, not UNAUTHENTICATED")
            print(f"token: refused without it ({e.code().name}: {e.details()}); health and reflection open")
    st = get_status(status_req(), timeout=10, metadata=metadata)
    mode = st.DESCRIPTOR.fields_by_name["attach_mode"].enum_type.values_by_number[st.attach_mode].name
    print(f"GetStatus: attach mode {mode}, {len(st.subscribers)} subscribers")

    watch_req, watch = method("WatchEvents", True)

    # A connection of our own, watched by the cookies of both ends.
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    cookies = {
        int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little"): role
        for s, role in ((client, "client"), (server, "server"))
    }
    req = watch_req()
    req.allow.add().cookies.extend(cookies)
    stream = watch(req, timeout=30, metadata=metadata)
    events, lost = [], []

    def take():
        try:
            for resp in stream:
                kind = resp.WhichOneof("message")
                if kind == "events":
                    events.extend(resp.events.events)
                elif kind == "lost":
                    lost.append(resp.lost)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                lost.append(e)

    reader = threading.Thread(target=take, daemon=True)
    reader.start()
    # The subscription is in place once socktapd lists it and its programs
    # record (the gate opens for the first subscriber).
    deadline = time.monotonic() + 10
    while True:
        st = get_status(status_req(), timeout=10, metadata=metadata)
        if st.subscribers and st.kernel_gate_open:
            break
        if time.monotonic() > deadline:
            fail(f"the WatchEvents stream never showed up in GetStatus with the gate open: {st}")
        time.sleep(0.01)

    for n in SIZES:
        client.sendall(b"s" * n)
        got = 0
        while got < n:
            got += len(server.recv(n - got))
    want = len(SIZES) * 2
    deadline = time.monotonic() + 10
    while len(events) < want and time.monotonic() < deadline and not lost:
        time.sleep(0.01)
    time.sleep(0.2)  # anything more would show up now
    stream.cancel()
    reader.join(5)
    if lost:
        fail(f"losses or errors on the stream: {lost}")

    kind_name = watch_req.DESCRIPTOR.file.pool.FindEnumTypeByName("socktap.v1.EventKind").values_by_number
    sends = [e.bytes for e in events if kind_name[e.kind].name == "EVENT_KIND_SEND"]
    recvs = [e.bytes for e in events if kind_name[e.kind].name == "EVENT_KIND_RECV"]
    if any(e.cookie not in cookies for e in events):
        fail(f"an event of another socket: {[e.cookie for e in events]} not in {sorted(cookies)}")
    if sends != SIZES:
        fail(f"sends {sends}, not the sizes sent {SIZES}")
    if sum(recvs) != sum(SIZES):
        fail(f"received {sum(recvs)} bytes in {len(recvs)} calls, not {sum(SIZES)}")
    if {cookies[e.cookie] for e in events if kind_name[e.kind].name == "EVENT_KIND_SEND"} != {"client"}:
        fail("sends reported on the wrong end")
    print(f"WatchEvents: {len(events)} events, sends {sends}, {sum(recvs)} bytes received in {len(recvs)} calls")

    # Bad input: INVALID_ARGUMENT naming the field.
    bad = watch_req()
    bad.allow.add().remote_cidrs.append("10.0.0.0/99")
    try:
        for _ in watch(bad, timeout=10, metadata=metadata):
            pass
        fail("a malformed CIDR was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "allow[0].remote_cidrs[0]" not in (e.details() or ""):
            fail(f"a malformed CIDR: {e.code()} {e.details()!r}")
        print(f"bad input: {e.code().name}: {e.details()}")
    print("grpc_core_client: ok")


if __name__ == "__main__":
    main()
