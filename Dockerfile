# syntax=docker/dockerfile:1
# The `keygate` binary (CLI, `keygate sync`, `keygate serve`) as a small
# image: built in a Rust stage, run as a non-root user from distroless/cc
# (glibc and CA certificates, no shell, no package manager).
#   docker build --build-arg KEYGATE_GIT_HASH=$(git rev-parse --short HEAD) -t keygate .
# The filter (.wasm) is not in this image: it ships as an OCI artifact
# (`make dist`, README "Distribution").

FROM rust:1.95-bookworm AS build
ARG KEYGATE_GIT_HASH=unknown
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    KEYGATE_GIT_HASH=${KEYGATE_GIT_HASH} cargo build --release --locked -p keygate-sidecar \
 && mkdir -p /out/var/lib/keygate \
 && cp target/release/keygate /out/keygate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keygate /usr/local/bin/keygate
# Owned by the runtime user so a fresh named volume mounted here is writable
# (the file store); a PostgreSQL store needs no local state.
COPY --from=build --chown=nonroot:nonroot /out/var/lib/keygate /var/lib/keygate
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["--help"]
