# oauth-proxy image: a static Go binary on scratch, for linux/amd64 and linux/arm64.
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=v0.1.0 -t ghcr.io/oauth-proxy/oauth-proxy:v0.1.0 --push .
# .ci/delivery reads the build flags, USER, ENV and COPY lines below and
# reproduces this image as a chroot without Docker.

# The builder runs on the build machine's own platform and cross-compiles for
# the target platform: no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26-trixie AS build
WORKDIR /src

# Modules first, in their own layer: it is rebuilt only when go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download

COPY *.go ./
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
# CGO_ENABLED=0: a static binary that needs no libc on scratch.
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o /out/oauth-proxy .

# No shell, no package manager, no secrets: the binary, the CA bundle that
# verifies TLS to the upstream, and nothing else.
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/oauth-proxy /oauth-proxy
USER 65532:65532
EXPOSE 8080
# In Kubernetes the ConfigMap is mounted here.
ENV CONFIG_PATH=/etc/anthropic-oauth-proxy/config.toml
ENTRYPOINT ["/oauth-proxy"]
