package main

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

// caBundle is where Go's crypto/x509 looks first for the system roots on Linux.
const caBundle = "/etc/ssl/certs/ca-certificates.crt"

var (
	builderImage = regexp.MustCompile(`^golang:(1\.[0-9]+)(\.[0-9]+)?-(bookworm|trixie|forky)$`)
	goDirective  = regexp.MustCompile(`(?m)^go (1\.[0-9]+)`)
	credential   = regexp.MustCompile(`(?i)secret|token|passw|key|auth|credential`)
)

// dockerfile is the parsed Dockerfile and build context, and the image they
// make: what .ci/delivery rebuilds and runs, and what the manifests match.
type dockerfile struct {
	repo           string
	all            []instructions.Command // the ARGs before the first FROM, then every stage's
	builder, final *instructions.Stage    // the stage the final one copies from, and the final one
	context        []string               // the files docker build sends, after .dockerignore
	build          goBuild                // the builder's go build, variables as written
	entrypoint     *instructions.EntrypointCommand
	ports          []string // EXPOSE

	buildFiles          []string // the context files the builder copies into its WORKDIR
	buildEnv, buildArgs []string // go build's NAME=value words and arguments, for the target
	binary, user        string   // ENTRYPOINT and USER
	uid, gid            int64    // USER, when it is uid:gid
	port                int32    // EXPOSE, when it is one port
	env                 []string // the final stage's ENV, NAME=value
	configPath          string   // ENV CONFIG_PATH
}

// loadDockerfile parses the Dockerfile and .dockerignore in repo and derives
// the image built for t.
func loadDockerfile(repo string, t target) (*dockerfile, error) {
	data, err := os.ReadFile(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		return nil, err
	}
	ast, err := parser.Parse(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("parse Dockerfile: %w", err)
	}
	stages, globalArgs, err := instructions.Parse(ast.AST, nil)
	if err == nil && len(stages) == 0 {
		err = errors.New("no FROM")
	}
	if err != nil {
		return nil, fmt.Errorf("parse Dockerfile: %w", err)
	}
	d := &dockerfile{repo: repo, final: &stages[len(stages)-1]}
	for i := range globalArgs {
		d.all = append(d.all, &globalArgs[i])
	}
	for _, s := range stages {
		d.all = append(d.all, s.Commands...)
	}
	for _, c := range commands[*instructions.CopyCommand](d.final.Commands) {
		if i, ok := instructions.HasStage(stages, c.From); ok && c.From != "" {
			d.builder = &stages[i]
		}
	}
	if d.builder == nil || d.builder == d.final {
		return nil, errors.New("the Dockerfile's final stage copies from no named build stage")
	}
	if d.context, err = buildContext(repo); err != nil {
		return nil, err
	}

	lex := shell.NewLex(ast.EscapeToken)
	lex.SkipUnsetEnv = true // $NAME stays as written where no value is given
	asWritten := shell.EnvsFromSlice(nil)
	for _, c := range d.all {
		// Unquotes the words of ENV, COPY, USER... and parses RUN --mount.
		if e, ok := c.(instructions.SupportsSingleWordExpansion); ok {
			if err := e.Expand(func(w string) (string, error) {
				w, _, err := lex.ProcessWord(w, asWritten)
				return w, err
			}); err != nil {
				return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(c), err)
			}
		}
	}
	forTarget := shell.EnvsFromSlice([]string{"TARGETOS=" + t.os, "TARGETARCH=" + t.arch, "VERSION=" + t.version})
	for _, run := range commands[*instructions.RunCommand](d.builder.Commands) {
		if d.build, err = findGoBuild(lex, run, asWritten); err != nil {
			return nil, err
		}
		if d.build.line > 0 {
			b, _ := findGoBuild(lex, run, forTarget)
			d.buildEnv, d.buildArgs = b.env, b.args
			break
		}
	}
	for _, c := range commands[*instructions.CopyCommand](d.builder.Commands) {
		for _, f := range matching(c.SourcePaths, d.context) {
			if !slices.Contains(d.buildFiles, f) {
				d.buildFiles = append(d.buildFiles, f)
			}
		}
	}
	for _, c := range d.final.Commands {
		switch c := c.(type) {
		case *instructions.EntrypointCommand:
			d.entrypoint, d.binary = c, strings.Join(c.CmdLine, " ")
		case *instructions.UserCommand:
			d.user = c.User
			fmt.Sscanf(c.User, "%d:%d", &d.uid, &d.gid) // the USER check prints them back to compare
		case *instructions.ExposeCommand:
			d.ports = append(d.ports, c.Ports...)
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				d.env = append(d.env, kv.String())
				if kv.Key == "CONFIG_PATH" {
					d.configPath = kv.Value
				}
			}
		}
	}
	if len(d.ports) == 1 {
		port, _ := strconv.ParseInt(strings.TrimSuffix(d.ports[0], "/tcp"), 10, 32)
		d.port = int32(port)
	}
	return d, nil
}

var dockerfileChecks = []check[*dockerfile]{
	{"builder: golang:<go.mod's 1.N>-<Debian release>, on $BUILDPLATFORM", func(d *dockerfile) (string, error) {
		goMod, err := os.ReadFile(filepath.Join(d.repo, "go.mod"))
		image, goLine := builderImage.FindStringSubmatch(d.builder.BaseName), goDirective.FindSubmatch(goMod)
		ok := image != nil && goLine != nil && image[1] == string(goLine[1]) && d.builder.Platform == "$BUILDPLATFORM"
		return d.builder.BaseName, cmp.Or(err, require(ok, "FROM --platform=%s %s, go.mod has %q",
			d.builder.Platform, d.builder.BaseName, goDirective.Find(goMod)))
	}},
	{"builder: go mod download is a layer of its own, before the sources are copied", func(d *dockerfile) (string, error) {
		copied := false
		for _, c := range d.builder.Commands {
			if c, ok := c.(*instructions.CopyCommand); ok {
				if copied || !slices.Equal(c.SourcePaths, []string{"go.mod", "go.sum"}) {
					return "", fmt.Errorf("line %d: %s before go mod download, want COPY go.mod go.sum ./ first", line(c), c)
				}
				copied = true
			}
			if c, ok := c.(*instructions.RunCommand); ok && copied && strings.Contains(c.String(), "go mod download") {
				return fmt.Sprintf("line %d", line(c)), nil
			}
		}
		return "", errors.New("no RUN go mod download after COPY go.mod go.sum ./")
	}},
	{"builder: CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath " +
		`-ldflags "-s -w -X main.version=$VERSION"`, func(d *dockerfile) (string, error) {
		b := d.build
		if b.line == 0 {
			return "", errors.New("no RUN with go build in the build stage")
		}
		var args []string // the stage's ARGs: undeclared, they are empty
		for _, a := range commands[*instructions.ArgCommand](d.builder.Commands) {
			for _, kv := range a.Args {
				args = append(args, "ARG "+kv.Key)
			}
		}
		for _, w := range []struct{ in, want []string }{
			{b.env, []string{"CGO_ENABLED=0", "GOOS=$TARGETOS", "GOARCH=$TARGETARCH"}},
			{b.args, []string{"-trimpath", "-o"}},
			{strings.Fields(b.flag("-ldflags")), []string{"-s", "-w", "-X", "main.version=$VERSION"}},
			{args, []string{"ARG TARGETOS", "ARG TARGETARCH", "ARG VERSION"}},
		} {
			if i := slices.IndexFunc(w.want, func(s string) bool { return !slices.Contains(w.in, s) }); i >= 0 {
				return "", fmt.Errorf("line %d: no %s in %q", b.line, w.want[i], w.in)
			}
		}
		expanded := strings.Join(slices.Concat(d.buildEnv, d.buildArgs), " ")
		return fmt.Sprintf("line %d", b.line), require(!strings.Contains(expanded, "$"),
			"line %d: go build uses a variable the reproduction does not set: %s", b.line, expanded)
	}},
	{".dockerignore: the build context is go.mod, go.sum and non-test Go sources", func(d *dockerfile) (string, error) {
		for _, f := range d.context {
			source := path.Dir(f) == "." && strings.HasSuffix(f, ".go") && !strings.HasSuffix(f, "_test.go")
			if f != "go.mod" && f != "go.sum" && !source {
				return "", fmt.Errorf("%s would be sent to the builder", f)
			}
		}
		return fmt.Sprintf("%d files", len(d.context)), nil
	}},
	{"builder: every COPY source is in the build context, copied to the WORKDIR", func(d *dockerfile) (string, error) {
		outside := func(src string) bool { return matching([]string{src}, d.context) == nil }
		return strings.Join(d.buildFiles, " "), offending(commands[*instructions.CopyCommand](d.builder.Commands),
			func(c *instructions.CopyCommand) bool {
				return c.DestPath != "./" && c.DestPath != "." || slices.ContainsFunc(c.SourcePaths, outside)
			})
	}},
	{"final stage: FROM scratch, only COPY USER EXPOSE ENV ENTRYPOINT LABEL", func(d *dockerfile) (string, error) {
		allowed := []string{"COPY", "USER", "EXPOSE", "ENV", "ENTRYPOINT", "LABEL"}
		return "", cmp.Or(require(d.final.BaseName == "scratch", "FROM %s", d.final.BaseName),
			offending(d.final.Commands, func(c instructions.Command) bool { return !slices.Contains(allowed, c.Name()) }))
	}},
	{"final stage: ENTRYPOINT is the exec form of one binary (scratch has no shell)", func(d *dockerfile) (string, error) {
		ep := d.entrypoint
		ok := ep != nil && !ep.PrependShell && len(ep.CmdLine) == 1 && path.IsAbs(ep.CmdLine[0])
		return d.binary, require(ok, "%v, want ENTRYPOINT [\"/<binary>\"]: the shell form needs /bin/sh", ep)
	}},
	{"final stage: copies exactly the binary and the CA bundle from the builder", func(d *dockerfile) (string, error) {
		var copies []string
		for _, c := range commands[*instructions.CopyCommand](d.final.Commands) {
			copies = append(copies, fmt.Sprintf("--from=%s %s %s", c.From, strings.Join(c.SourcePaths, " "), c.DestPath))
		}
		from := "--from=" + d.builder.Name + " "
		expected := []string{from + caBundle + " " + caBundle, from + d.build.flag("-o") + " " + d.binary}
		slices.Sort(copies)
		slices.Sort(expected)
		return strings.Join(copies, ", "), unequal(want{"its COPY lines", copies, expected})
	}},
	{"final stage: USER is a numeric non-root uid:gid", func(d *dockerfile) (string, error) {
		ok := fmt.Sprintf("%d:%d", d.uid, d.gid) == d.user && d.uid != 0 && d.gid != 0
		return d.user, require(ok, "USER %q", d.user)
	}},
	{"final stage: EXPOSE one TCP port", func(d *dockerfile) (string, error) {
		return strings.Join(d.ports, " "), require(d.port > 0, "EXPOSE %v", d.ports)
	}},
	{"final stage: ENV CONFIG_PATH is an absolute path, no ENV uses a variable", func(d *dockerfile) (string, error) {
		ok := path.IsAbs(d.configPath) && !strings.Contains(strings.Join(d.env, " "), "$")
		return d.configPath, require(ok, "ENV %q", d.env)
	}},
	{"no secrets: no ADD, no secret mount, no ARG or ENV named like a credential", func(d *dockerfile) (string, error) {
		return "", offending(d.all, func(c instructions.Command) bool {
			var names []string // of ARGs, ENVs and RUN --mount types
			switch c := c.(type) {
			case *instructions.AddCommand:
				return true
			case *instructions.RunCommand:
				for _, m := range instructions.GetMounts(c) {
					names = append(names, string(m.Type))
				}
			case *instructions.ArgCommand:
				for _, kv := range c.Args {
					names = append(names, kv.Key)
				}
			case *instructions.EnvCommand:
				for _, kv := range c.Env {
					names = append(names, kv.Key)
				}
			}
			return slices.ContainsFunc(names, credential.MatchString)
		})
	}},
}

// commands returns the instructions of type T among cs.
func commands[T instructions.Command](cs []instructions.Command) []T {
	var out []T
	for _, c := range cs {
		if c, ok := c.(T); ok {
			out = append(out, c)
		}
	}
	return out
}

// line is where c starts in the Dockerfile.
func line(c instructions.Command) int { return c.Location()[0].Start.Line }

// offending returns "line N: INSTRUCTION" for the first of cs that bad
// reports, or nil.
func offending[T instructions.Command](cs []T, bad func(T) bool) error {
	if i := slices.IndexFunc(cs, bad); i >= 0 {
		return fmt.Errorf("line %d: %v", line(cs[i]), cs[i])
	}
	return nil
}

// matching returns the files that one of the COPY source patterns matches.
func matching(patterns, files []string) []string {
	var out []string
	for _, f := range files {
		for _, p := range patterns {
			if ok, _ := path.Match(p, f); ok {
				out = append(out, f)
				break
			}
		}
	}
	return out
}

// goBuild is a go build command: the words before "go", and those after it;
// its zero value is none.
type goBuild struct {
	line      int
	env, args []string
}

// flag returns the word after name in the go build arguments.
func (b goBuild) flag(name string) string {
	if i := slices.Index(b.args, name); i >= 0 && i+1 < len(b.args) {
		return b.args[i+1]
	}
	return ""
}

// findGoBuild returns the go build among the commands of a RUN line, split
// at && || and ;, with the variables in env expanded.
func findGoBuild(lex *shell.Lex, run *instructions.RunCommand, env shell.EnvGetter) (goBuild, error) {
	words, err := lex.ProcessWords(strings.Join(run.CmdLine, " "), env)
	if err != nil {
		return goBuild{}, fmt.Errorf("line %d of the Dockerfile: %w", line(run), err)
	}
	for len(words) > 0 {
		end := slices.IndexFunc(words, func(w string) bool { return w == "&&" || w == "||" || w == ";" })
		if end < 0 {
			end = len(words)
		}
		cmd := words[:end]
		words = words[min(end+1, len(words)):]
		i := slices.IndexFunc(cmd, func(w string) bool { return !strings.Contains(w, "=") })
		if i >= 0 && i+1 < len(cmd) && cmd[i] == "go" && cmd[i+1] == "build" {
			return goBuild{line: line(run), env: cmd[:i:i], args: cmd[i+1:]}, nil
		}
	}
	return goBuild{}, nil
}

// buildContext lists the repository files docker build would send, after
// .dockerignore, as slash-separated paths relative to repo.
func buildContext(repo string) ([]string, error) {
	data, err := os.ReadFile(filepath.Join(repo, ".dockerignore"))
	if err != nil {
		return nil, err
	}
	patterns, err := ignorefile.ReadAll(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf(".dockerignore: %w", err)
	}
	ignore, err := patternmatcher.New(patterns)
	if err != nil {
		return nil, fmt.Errorf(".dockerignore: %w", err)
	}
	var files []string
	err = filepath.WalkDir(repo, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(repo, p)
		rel = filepath.ToSlash(rel)
		ignored, err := ignore.MatchesOrParentMatches(rel)
		// Docker always reads these two itself; COPY never sees them.
		if !ignored && rel != "Dockerfile" && rel != ".dockerignore" {
			files = append(files, rel)
		}
		return err
	})
	return files, err
}
