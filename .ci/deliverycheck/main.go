// Command deliverycheck verifies oauth-proxy's delivery files: the rendered
// Kubernetes manifests, the Dockerfile and .dockerignore, and a binary built
// the way the Dockerfile builds it. .ci/delivery runs it.
//
//	deliverycheck static -repo DIR -rendered FILE -out DIR -binary PATH [-version V] [-goos OS] [-goarch ARCH]
//
// checks the manifests (the output of kubectl kustomize k8s) and the
// Dockerfile, and writes to -out the ConfigMap's config.toml and image.env:
// KEY=VALUE lines telling .ci/delivery how to rebuild and run the image
// without Docker (the files the builder copies, the go build command with its
// output at -binary, the final stage's files, USER, ENV and the pod's env).
//
//	deliverycheck binary -file PATH -ca FILE [-version V] [-goos OS] [-goarch ARCH]
//
// checks that the binary is a stripped static executable for the platform,
// built with the Dockerfile's settings, and that FILE is a usable CA bundle.
//
// Each invariant prints one line, "ok" or "FAIL"; the exit code is 1 if any failed.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/equality"
)

const usage = `usage: deliverycheck static -repo DIR -rendered FILE -out DIR -binary PATH [target]
       deliverycheck binary -file PATH -ca FILE [target]
target: [-version V] [-goos OS] [-goarch ARCH]`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return 2
	}
	fs := flag.NewFlagSet("deliverycheck "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	var t target
	fs.StringVar(&t.version, "version", "ci", "value given to the Dockerfile's VERSION build argument")
	fs.StringVar(&t.os, "goos", "linux", "target OS (the Dockerfile's TARGETOS)")
	fs.StringVar(&t.arch, "goarch", "amd64", "target architecture (the Dockerfile's TARGETARCH)")
	repo := fs.String("repo", ".", "static: repository root (Dockerfile, .dockerignore, go.mod, k8s/, the example config)")
	rendered := fs.String("rendered", "", "static: output of kubectl kustomize k8s")
	out := fs.String("out", "", "static: directory for config.toml and image.env")
	binary := fs.String("binary", "", "static: where the reproduced go build writes the binary")
	file := fs.String("file", "", "binary: the built binary")
	ca := fs.String("ca", "", "binary: the CA bundle the image carries")
	if fs.Parse(args[1:]) != nil {
		return 2
	}
	r := &report{w: stdout}
	var err error
	switch {
	case args[0] == "static" && *rendered != "" && *out != "" && *binary != "":
		err = checkStatic(r, *repo, *rendered, *out, *binary, t)
	case args[0] == "binary" && *file != "" && *ca != "":
		err = checkBinary(r, *file, *ca, t)
	default:
		fmt.Fprintln(stderr, usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "deliverycheck %s: %v\n", args[0], err)
		return 1
	}
	if r.failures > 0 {
		fmt.Fprintf(stdout, "%d check(s) failed\n", r.failures)
		return 1
	}
	return 0
}

// target is the platform and version the image is built for.
type target struct{ os, arch, version string }

// checkStatic checks the Dockerfile, then the manifests against it, and
// writes the ConfigMap's config.toml and image.env to out, with the go build
// output at binary. Failed invariants are counted in r; the error is for a
// file that cannot be read, parsed or written.
func checkStatic(r *report, repo, rendered, out, binary string, t target) error {
	d, err := loadDockerfile(repo, t)
	if err != nil {
		return err
	}
	runChecks(r, "Dockerfile and .dockerignore:", dockerfileChecks, d)
	m, err := loadManifests(repo, rendered, d)
	if err != nil {
		return err
	}
	runChecks(r, "Kubernetes manifests (kubectl kustomize k8s):", manifestChecks, m)
	if err := os.WriteFile(filepath.Join(out, "config.toml"), []byte(m.cm.Data[configKey]), 0o644); err != nil {
		return err
	}

	// image.env: one KEY=VALUE per line; keys may repeat, in order.
	var lines []string
	add := func(key string, values ...string) {
		for _, v := range values {
			lines = append(lines, key+"="+v)
		}
	}
	add("BUILD_FILE", d.buildFiles...)
	add("BUILD_ENV", d.buildEnv...)
	for i, a := range d.buildArgs {
		if i > 0 && d.buildArgs[i-1] == "-o" {
			a = binary
		}
		add("BUILD_ARG", a)
	}
	add("IMAGE_BINARY", d.binary)
	add("IMAGE_CA", caBundle)
	add("IMAGE_USER", d.user)
	add("IMAGE_PORT", fmt.Sprint(d.port))
	add("IMAGE_ENV", d.env...)
	for _, e := range m.c.Env {
		add("POD_ENV", e.Name+"="+e.Value)
	}
	add("CONFIG_FILE", d.configPath) // the mount check holds the mounted file to CONFIG_PATH
	if strings.ContainsAny(strings.Join(lines, ""), "\n\x00") {
		return fmt.Errorf("image.env: a value holds a newline or NUL: %q", lines)
	}
	return os.WriteFile(filepath.Join(out, "image.env"), []byte(strings.Join(lines, "\n")+"\n"), 0o644)
}

// report prints one line per invariant and counts the failures.
type report struct {
	w        io.Writer
	failures int
}

// check is one invariant of a T: what it says, and the function that returns
// a detail to print when it holds or the reason it does not.
type check[T any] struct {
	what string
	fn   func(T) (detail string, err error)
}

// runChecks prints heading, then checks each invariant of v in order:
// "ok   what (detail)" or "FAIL what: err".
func runChecks[T any](r *report, heading string, checks []check[T], v T) {
	fmt.Fprintln(r.w, heading)
	for _, c := range checks {
		switch detail, err := c.fn(v); {
		case err != nil:
			r.failures++
			fmt.Fprintf(r.w, "  FAIL %s: %v\n", c.what, err)
		case detail != "":
			fmt.Fprintf(r.w, "  ok   %s (%s)\n", c.what, detail)
		default:
			fmt.Fprintf(r.w, "  ok   %s\n", c.what)
		}
	}
}

// want is a value an invariant requires: what it is, what it was found to
// be, and what it must be.
type want struct {
	name      string
	got, want any
}

// unequal reports the wants whose got differs from their want, as Kubernetes
// compares values (nil equals empty, quantities by value), or nil.
func unequal(wants ...want) error {
	var problems []string
	for _, w := range wants {
		if !equality.Semantic.DeepEqual(w.got, w.want) {
			problems = append(problems, differences(w.name, asJSON(w.got), asJSON(w.want))...)
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// asJSON is v as encoding/json decodes its encoding: objects become maps.
func asJSON(v any) (j any) {
	data, _ := json.Marshal(v)
	json.Unmarshal(data, &j)
	return j
}

// differences says how got differs from want: of two objects, field by
// field, so that one wrong field of a large object stands out.
func differences(name string, got, want any) []string {
	g, gotObject := got.(map[string]any)
	w, wantObject := want.(map[string]any)
	if !gotObject || !wantObject || reflect.DeepEqual(g, w) {
		gotJSON, _ := json.Marshal(got)
		wantJSON, _ := json.Marshal(want)
		return []string{fmt.Sprintf("%s is %s, want %s", name, gotJSON, wantJSON)}
	}
	fields := maps.Clone(w)
	maps.Copy(fields, g)
	var out []string
	for _, k := range slices.Sorted(maps.Keys(fields)) {
		if !reflect.DeepEqual(g[k], w[k]) {
			out = append(out, differences(name+"."+k, g[k], w[k])...)
		}
	}
	return out
}

// require returns nil if ok holds, else the error that format describes.
func require(ok bool, format string, args ...any) error {
	if ok {
		return nil
	}
	return fmt.Errorf(format, args...)
}
