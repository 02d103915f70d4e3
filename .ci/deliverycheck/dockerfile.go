package main

import (
	"bytes"
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

// dockerfile is the parsed Dockerfile, its build context and the image it describes.
type dockerfile struct {
	repo           string
	all            []instructions.Command // the ARGs before the first FROM, then every stage's
	builder, final *instructions.Stage    // the stage the final one copies from, and the final one
	context        []string               // the files docker build sends, after .dockerignore
	build          *goBuild               // the builder's go build, variables as written
	entrypoint     *instructions.EntrypointCommand
	ports          []string // EXPOSE
	img            image
}

// image is how .ci/delivery rebuilds and runs the image without Docker, and
// what the manifests are held to.
type image struct {
	buildFiles []string // the context files the builder copies into its WORKDIR
	buildEnv   []string // go build's NAME=value words, for the target
	buildArgs  []string // go build's arguments, for the target, with -o at the requested path
	binary     string   // the ENTRYPOINT
	user       string   // USER
	uid, gid   int64    // USER, when it is uid:gid
	port       int32    // EXPOSE, when it is one port
	env        []string // the final stage's ENV, NAME=value
	configPath string   // ENV CONFIG_PATH
}

// goBuild is a go build command: the words before "go" and after it.
type goBuild struct {
	line      int
	env, args []string
}

// flag returns the word after name in the go build arguments.
func (b *goBuild) flag(name string) string {
	if i := slices.Index(b.args, name); i >= 0 && i+1 < len(b.args) {
		return b.args[i+1]
	}
	return ""
}

var (
	builderImage = regexp.MustCompile(`^golang:(1\.[0-9]+)(\.[0-9]+)?-(bookworm|trixie|forky)$`)
	goDirective  = regexp.MustCompile(`(?m)^go (1\.[0-9]+)`)
	credential   = regexp.MustCompile(`(?i)secret|token|passw|key|auth|credential`)
)

// loadDockerfile parses the Dockerfile and .dockerignore in repo and derives
// the image for a build of t whose binary goes to binaryOut.
func loadDockerfile(repo string, t target, binaryOut string) (*dockerfile, error) {
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
	d := &dockerfile{repo: repo}
	for i := range globalArgs {
		d.all = append(d.all, &globalArgs[i])
	}
	for i, s := range stages {
		d.all = append(d.all, s.Commands...)
		d.final = &stages[i]
	}
	for _, c := range commands[*instructions.CopyCommand](d.final.Commands) {
		if i := slices.IndexFunc(stages, func(s instructions.Stage) bool { return s.Name != "" && s.Name == c.From }); i >= 0 {
			d.builder = &stages[i]
		}
	}
	if d.builder == nil || d.builder == d.final {
		return nil, errors.New("the Dockerfile's final stage copies from no named build stage")
	}
	for _, run := range commands[*instructions.RunCommand](d.all) {
		// Evaluates the --mount flags, with their words as written.
		if err := run.Expand(func(word string) (string, error) { return word, nil }); err != nil {
			return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(run), err)
		}
	}
	if d.context, err = buildContext(repo); err != nil {
		return nil, err
	}

	lex := shell.NewLex(ast.EscapeToken)
	lex.SkipUnsetEnv = true // $NAME stays as written where no value is given
	vars := shell.EnvsFromSlice([]string{"TARGETOS=" + t.os, "TARGETARCH=" + t.arch, "VERSION=" + t.version})
	for _, run := range commands[*instructions.RunCommand](d.builder.Commands) {
		if d.build, err = findGoBuild(lex, run, shell.EnvsFromSlice(nil)); err != nil {
			return nil, err
		}
		if d.build != nil {
			x, _ := findGoBuild(lex, run, vars)
			if i := slices.Index(x.args, "-o"); i >= 0 && i+1 < len(x.args) {
				x.args[i+1] = binaryOut
			}
			d.img.buildEnv, d.img.buildArgs = x.env, x.args
			break
		}
	}
	for _, c := range commands[*instructions.CopyCommand](d.builder.Commands) {
		for _, f := range d.context {
			if slices.ContainsFunc(c.SourcePaths, func(src string) bool { return match(src, f) }) && !slices.Contains(d.img.buildFiles, f) {
				d.img.buildFiles = append(d.img.buildFiles, f)
			}
		}
	}
	for _, c := range d.final.Commands {
		switch c := c.(type) {
		case *instructions.EntrypointCommand:
			d.entrypoint, d.img.binary = c, strings.Join(c.CmdLine, " ")
		case *instructions.UserCommand:
			d.img.user = c.User
			fmt.Sscanf(c.User, "%d:%d", &d.img.uid, &d.img.gid) // the check prints them back to compare with USER
		case *instructions.ExposeCommand:
			d.ports = append(d.ports, c.Ports...)
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				value, _, err := lex.ProcessWord(kv.Value, shell.EnvsFromSlice(nil))
				if err != nil {
					return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(c), err)
				}
				if d.img.env = append(d.img.env, kv.Key+"="+value); kv.Key == "CONFIG_PATH" {
					d.img.configPath = value
				}
			}
		}
	}
	if len(d.ports) == 1 {
		port, _ := strconv.ParseInt(strings.TrimSuffix(d.ports[0], "/tcp"), 10, 32)
		d.img.port = int32(port)
	}
	return d, nil
}

var dockerfileChecks = []check[*dockerfile]{
	{"builder: official Go image at go.mod's minor version, Debian variant, on $BUILDPLATFORM", func(d *dockerfile) (string, error) {
		goMod, err := os.ReadFile(filepath.Join(d.repo, "go.mod"))
		if err != nil {
			return "", err
		}
		image, goLine := builderImage.FindStringSubmatch(d.builder.BaseName), goDirective.FindSubmatch(goMod)
		if image == nil || goLine == nil || image[1] != string(goLine[1]) || d.builder.Platform != "$BUILDPLATFORM" {
			return "", fmt.Errorf("FROM --platform=%s %s and go.mod's %q, want --platform=$BUILDPLATFORM (cross-compile, no emulation) golang:<go.mod's 1.N>-<Debian release>",
				d.builder.Platform, d.builder.BaseName, goDirective.Find(goMod))
		}
		return d.builder.BaseName, nil
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
			if c, ok := c.(*instructions.RunCommand); ok && copied && strings.Contains(strings.Join(c.CmdLine, " "), "go mod download") {
				return fmt.Sprintf("line %d", line(c)), nil
			}
		}
		return "", errors.New("no RUN go mod download after COPY go.mod go.sum ./")
	}},
	{`builder: CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -X main.version=$VERSION"`, func(d *dockerfile) (string, error) {
		b := d.build
		if b == nil {
			return "", errors.New("no RUN with go build in the build stage")
		}
		var declared []string
		for _, a := range commands[*instructions.ArgCommand](d.builder.Commands) {
			for _, kv := range a.Args {
				declared = append(declared, kv.Key)
			}
		}
		for _, w := range []struct {
			where    string
			in, want []string
		}{
			{"go build's environment", b.env, []string{"CGO_ENABLED=0", "GOOS=$TARGETOS", "GOARCH=$TARGETARCH"}},
			{"go build's arguments", b.args, []string{"-trimpath", "-o"}},
			{"-ldflags", strings.Fields(b.flag("-ldflags")), []string{"-s", "-w", "-X", "main.version=$VERSION"}},
			{"the build stage's ARGs (undeclared, they are empty)", declared, []string{"TARGETOS", "TARGETARCH", "VERSION"}},
		} {
			for _, want := range w.want {
				if !slices.Contains(w.in, want) {
					return "", fmt.Errorf("line %d: no %s in %s %q", b.line, want, w.where, w.in)
				}
			}
		}
		if slices.ContainsFunc(slices.Concat(d.img.buildEnv, d.img.buildArgs), func(w string) bool { return strings.Contains(w, "$") }) {
			return "", fmt.Errorf("line %d: go build uses a variable the reproduction does not set", b.line)
		}
		return fmt.Sprintf("line %d", b.line), nil
	}},
	{".dockerignore: the build context holds only go.mod, go.sum and non-test Go sources", func(d *dockerfile) (string, error) {
		for _, f := range d.context {
			if f != "go.mod" && f != "go.sum" && (path.Dir(f) != "." || !strings.HasSuffix(f, ".go") || strings.HasSuffix(f, "_test.go")) {
				return "", fmt.Errorf("%s would be sent to the builder", f)
			}
		}
		return fmt.Sprintf("%d files", len(d.context)), nil
	}},
	{"builder: every COPY source is in the build context", func(d *dockerfile) (string, error) {
		for _, c := range commands[*instructions.CopyCommand](d.builder.Commands) {
			for _, src := range c.SourcePaths {
				if !slices.ContainsFunc(d.context, func(f string) bool { return match(src, f) }) || c.DestPath != "./" && c.DestPath != "." {
					return "", fmt.Errorf("line %d: %s, want sources that match files in the build context, copied to the WORKDIR ./", line(c), c)
				}
			}
		}
		return strings.Join(d.img.buildFiles, " "), nil
	}},
	{"final stage: FROM scratch, only COPY USER EXPOSE ENV ENTRYPOINT LABEL", func(d *dockerfile) (string, error) {
		if d.final.BaseName != "scratch" {
			return "", fmt.Errorf("FROM %s", d.final.BaseName)
		}
		for _, c := range d.final.Commands {
			if !slices.Contains([]string{"COPY", "USER", "EXPOSE", "ENV", "ENTRYPOINT", "LABEL"}, c.Name()) {
				return "", fmt.Errorf("line %d: %s", line(c), c)
			}
		}
		return "", nil
	}},
	{"final stage: ENTRYPOINT is the exec form of one binary (scratch has no shell)", func(d *dockerfile) (string, error) {
		if ep := d.entrypoint; ep == nil || ep.PrependShell || len(ep.CmdLine) != 1 || !path.IsAbs(ep.CmdLine[0]) {
			return "", fmt.Errorf("%v, want ENTRYPOINT [\"/<binary>\"]: the shell form needs /bin/sh", ep)
		}
		return d.img.binary, nil
	}},
	{"final stage: copies exactly the built binary and the CA bundle from the builder", func(d *dockerfile) (string, error) {
		var copies []string
		for _, c := range commands[*instructions.CopyCommand](d.final.Commands) {
			if c.From != d.builder.Name || len(c.SourcePaths) != 1 {
				return "", fmt.Errorf("line %d: %s, want one file from stage %s", line(c), c, d.builder.Name)
			}
			copies = append(copies, c.SourcePaths[0]+" "+c.DestPath)
		}
		want := []string{caBundle + " " + caBundle}
		if d.build != nil {
			want = append(want, d.build.flag("-o")+" "+d.img.binary)
		}
		if slices.Sort(copies); !slices.Equal(copies, want) {
			return "", fmt.Errorf("copies %q, want %q", copies, want)
		}
		return strings.Join(copies, ", "), nil
	}},
	{"final stage: USER is a numeric non-root uid:gid", func(d *dockerfile) (string, error) {
		if fmt.Sprintf("%d:%d", d.img.uid, d.img.gid) != d.img.user || d.img.uid == 0 || d.img.gid == 0 {
			return "", fmt.Errorf("USER %q, want numeric uid:gid, neither 0", d.img.user)
		}
		return d.img.user, nil
	}},
	{"final stage: EXPOSE one TCP port", func(d *dockerfile) (string, error) {
		if d.img.port <= 0 {
			return "", fmt.Errorf("EXPOSE %v", d.ports)
		}
		return d.ports[0], nil
	}},
	{"final stage: ENV CONFIG_PATH is an absolute path", func(d *dockerfile) (string, error) {
		if !path.IsAbs(d.img.configPath) || strings.Contains(strings.Join(d.img.env, " "), "$") {
			return "", fmt.Errorf("ENV %q, want CONFIG_PATH=/<path>, and no variables", d.img.env)
		}
		return d.img.configPath, nil
	}},
	{"no secrets: no ADD, no secret mount, no ARG or ENV named like a credential", func(d *dockerfile) (string, error) {
		for _, c := range d.all {
			var names []string // of ARGs, ENVs and RUN --mount types
			switch c := c.(type) {
			case *instructions.AddCommand:
				return "", fmt.Errorf("line %d: %s", line(c), c)
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
			if slices.ContainsFunc(names, credential.MatchString) {
				return "", fmt.Errorf("line %d: %s", line(c), c)
			}
		}
		return "", nil
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

// match reports whether a COPY source pattern matches the context file f.
func match(pattern, f string) bool {
	ok, _ := path.Match(pattern, f)
	return ok
}

// findGoBuild returns the go build among the commands of a RUN line, split
// at && || and ;, with the variables in env expanded.
func findGoBuild(lex *shell.Lex, run *instructions.RunCommand, env shell.EnvGetter) (*goBuild, error) {
	words, err := lex.ProcessWords(strings.Join(run.CmdLine, " "), env)
	if err != nil {
		return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(run), err)
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
			return &goBuild{line: line(run), env: cmd[:i:i], args: cmd[i+1:]}, nil
		}
	}
	return nil, nil
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
