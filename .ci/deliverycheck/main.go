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
	"flag"
	"fmt"
	"io"
	"os"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: deliverycheck static|binary [flags]")
		return 2
	}
	fs := flag.NewFlagSet("deliverycheck "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	version := fs.String("version", "ci", "value given to the Dockerfile's VERSION build argument")
	goos := fs.String("goos", "linux", "target OS (the Dockerfile's TARGETOS)")
	goarch := fs.String("goarch", "amd64", "target architecture (the Dockerfile's TARGETARCH)")
	r := &report{w: stdout}
	switch args[0] {
	case "static":
		repo := fs.String("repo", ".", "repository root: Dockerfile, .dockerignore, go.mod, k8s/ and the example config")
		rendered := fs.String("rendered", "", "output of kubectl kustomize k8s")
		out := fs.String("out", "", "directory for config.toml and image.env")
		binary := fs.String("binary", "", "where the reproduced go build writes the binary")
		if fs.Parse(args[1:]) != nil {
			return 2
		}
		if *rendered == "" || *out == "" || *binary == "" {
			fmt.Fprintln(stderr, "deliverycheck static: -rendered, -out and -binary are required")
			return 2
		}
		if err := checkStatic(r, staticInput{
			repo: *repo, rendered: *rendered, out: *out, binary: *binary,
			target: target{os: *goos, arch: *goarch, version: *version},
		}); err != nil {
			fmt.Fprintf(stderr, "deliverycheck static: %v\n", err)
			return 1
		}
	case "binary":
		file := fs.String("file", "", "the built binary")
		ca := fs.String("ca", "", "the CA bundle the image carries")
		if fs.Parse(args[1:]) != nil {
			return 2
		}
		if *file == "" || *ca == "" {
			fmt.Fprintln(stderr, "deliverycheck binary: -file and -ca are required")
			return 2
		}
		checkBinary(r, *file, *ca, target{os: *goos, arch: *goarch, version: *version})
	default:
		fmt.Fprintf(stderr, "deliverycheck: unknown command %q, want static or binary\n", args[0])
		return 2
	}
	if r.failures > 0 {
		fmt.Fprintf(stdout, "%d check(s) failed\n", r.failures)
		return 1
	}
	return 0
}

// target is the platform and version the image is built for.
type target struct {
	os, arch, version string
}

// report prints one line per invariant and counts the failures.
type report struct {
	w        io.Writer
	failures int
}

// check runs fn and prints "ok   what (detail)" or "FAIL what: error".
func (r *report) check(what string, fn func() (detail string, err error)) {
	detail, err := fn()
	switch {
	case err != nil:
		r.failures++
		fmt.Fprintf(r.w, "  FAIL %s: %v\n", what, err)
	case detail != "":
		fmt.Fprintf(r.w, "  ok   %s (%s)\n", what, detail)
	default:
		fmt.Fprintf(r.w, "  ok   %s\n", what)
	}
}

// check is one invariant of a T: what it says, and the function that returns
// a detail to print when it holds or the reason it does not.
type check[T any] struct {
	what string
	fn   func(T) (detail string, err error)
}

// runChecks prints heading, then checks each invariant of v in order.
func runChecks[T any](r *report, heading string, checks []check[T], v T) {
	fmt.Fprintln(r.w, heading)
	for _, c := range checks {
		r.check(c.what, func() (string, error) { return c.fn(v) })
	}
}
