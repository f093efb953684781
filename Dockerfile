# syntax=docker/dockerfile:1
# One image with every idsync binary: idsync-idm, idsync-detector,
# idsync-correlator, idsync-applier, idsync-provisioner and the idsync CLI.
# The Helm chart (deploy/helm/idsync) runs each service from it by command.
#   docker build -t idsync:dev .
# TLS is rustls with the system's roots (rustls-native-certs); there is no
# OpenSSL, so the runtime needs glibc, libgcc and CA certificates only.

ARG RUST_VERSION=1.95
# Builder and runtime are both Debian 12 (bookworm): the same glibc.
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# ring and the protobuf build (protox, no protoc) need only the C toolchain
# the slim image has.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p idsync-idm -p idsync-detector -p idsync-correlator \
      -p idsync-applier -p idsync-provisioner -p idsync \
 && mkdir -p /out \
 && for b in idsync-idm idsync-detector idsync-correlator idsync-applier idsync-provisioner idsync; do \
      install -m 0755 "target/release/$b" /out/; \
    done

# distroless/cc: glibc, libgcc_s, CA certificates, no shell, no package
# manager. Runs as 10001 (the chart's runAsUser) whatever the platform.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
ENV IDSYNC_LOG_FORMAT=json \
    IDSYNC_HEALTH_BIND=0.0.0.0:9090
EXPOSE 50051 50052 9090
# The chart sets the command per service; alone, the image shows the CLI.
ENTRYPOINT ["/usr/local/bin/idsync"]
CMD ["--help"]
