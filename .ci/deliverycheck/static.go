package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// staticInput is what "deliverycheck static" reads and where it writes.
type staticInput struct {
	repo     string // repository root
	rendered string // kubectl kustomize k8s output
	out      string // directory for config.toml and image.env
	binary   string // the -o path of the reproduced go build
	target   target
}

// checkStatic checks the Dockerfile, then the manifests against it, and
// writes the ConfigMap's config.toml and the image plan to in.out. It returns
// an error only when a file cannot be read or written; failed invariants are
// counted in r.
func checkStatic(r *report, in staticInput) error {
	fmt.Fprintln(r.w, "Dockerfile and .dockerignore:")
	plan, facts, err := checkDockerfile(r, in.repo, in.target, in.binary)
	if err != nil {
		return err
	}
	rendered, err := os.ReadFile(in.rendered)
	if err != nil {
		return err
	}
	fmt.Fprintln(r.w, "Kubernetes manifests (kubectl kustomize k8s):")
	config, podEnv, configFile, err := checkManifests(r, in.repo, rendered, facts)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(in.out, "config.toml"), config, 0o644); err != nil {
		return err
	}
	// image.env: one KEY=VALUE per line; keys may repeat, in order.
	var b strings.Builder
	line := func(k, v string) {
		if strings.ContainsAny(v, "\n\x00") {
			err = fmt.Errorf("image.env: %s value %q holds a newline or NUL", k, v)
		}
		fmt.Fprintf(&b, "%s=%s\n", k, v)
	}
	for _, f := range plan.buildFiles {
		line("BUILD_FILE", f)
	}
	for _, e := range plan.buildEnv {
		line("BUILD_ENV", e)
	}
	for _, a := range plan.buildArgs {
		line("BUILD_ARG", a)
	}
	line("IMAGE_BINARY", plan.binary)
	line("IMAGE_CA", caBundle)
	line("IMAGE_USER", plan.user)
	line("IMAGE_PORT", fmt.Sprint(facts.port))
	for _, e := range plan.env {
		line("IMAGE_ENV", e)
	}
	for _, e := range podEnv {
		line("POD_ENV", e)
	}
	line("CONFIG_FILE", configFile)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(in.out, "image.env"), []byte(b.String()), 0o644)
}
