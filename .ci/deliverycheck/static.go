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
// an error only when a file cannot be read, parsed or written; failed
// invariants are counted in r.
func checkStatic(r *report, in staticInput) error {
	d, err := loadDockerfile(in.repo, in.target, in.binary)
	if err != nil {
		return err
	}
	runChecks(r, "Dockerfile and .dockerignore:", dockerfileChecks, d)
	rendered, err := os.ReadFile(in.rendered)
	if err != nil {
		return err
	}
	m, err := loadManifests(in.repo, rendered, &d.img)
	if err != nil {
		return err
	}
	runChecks(r, "Kubernetes manifests (kubectl kustomize k8s):", manifestChecks, m)
	if err := os.WriteFile(filepath.Join(in.out, "config.toml"), []byte(m.cm.Data[configKey]), 0o644); err != nil {
		return err
	}

	// image.env: one KEY=VALUE per line; keys may repeat, in order.
	img := d.img
	var podEnv []string
	for _, e := range m.c.Env {
		podEnv = append(podEnv, e.Name+"="+e.Value)
	}
	var b strings.Builder
	for _, kv := range []struct {
		key    string
		values []string
	}{
		{"BUILD_FILE", img.buildFiles},
		{"BUILD_ENV", img.buildEnv},
		{"BUILD_ARG", img.buildArgs},
		{"IMAGE_BINARY", []string{img.binary}},
		{"IMAGE_CA", []string{caBundle}},
		{"IMAGE_USER", []string{img.user}},
		{"IMAGE_PORT", []string{fmt.Sprint(img.port)}},
		{"IMAGE_ENV", img.env},
		{"POD_ENV", podEnv},
		// The mount check holds the mounted file to CONFIG_PATH.
		{"CONFIG_FILE", []string{img.configPath}},
	} {
		for _, v := range kv.values {
			if strings.ContainsAny(v, "\n\x00") {
				return fmt.Errorf("image.env: %s value %q holds a newline or NUL", kv.key, v)
			}
			fmt.Fprintf(&b, "%s=%s\n", kv.key, v)
		}
	}
	return os.WriteFile(filepath.Join(in.out, "image.env"), []byte(b.String()), 0o644)
}
