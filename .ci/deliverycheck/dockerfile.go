package main

import (
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
	globalArgs     []instructions.ArgCommand // ARGs before the first FROM
	stages         []instructions.Stage
	builder, final *instructions.Stage
	context        []string // the files docker build sends, after .dockerignore
	build          *goBuild // the builder's go build, variables as written
	ports          []string // the final stage's EXPOSE
	entrypoint     *instructions.EntrypointCommand
	img            image
}

// image tells .ci/delivery how to rebuild and run the image without Docker;
// the manifests are held to its user, port and CONFIG_PATH.
type image struct {
	buildFiles []string // context files the builder copies into its WORKDIR
	buildEnv   []string // NAME=value for go build, expanded for the target
	buildArgs  []string // arguments after "go", expanded, with -o at the requested path
	binary     string   // the ENTRYPOINT binary's path in the image
	user       string   // USER
	uid, gid   int64    // USER, when it is numeric uid:gid
	port       int32    // EXPOSE, when it is one port
	env        []string // the final stage's ENV, NAME=value
	configPath string   // ENV CONFIG_PATH
}

// goBuild is the go build command of a RUN line.
type goBuild struct {
	line    int      // in the Dockerfile
	env     []string // NAME=value words before "go"
	args    []string // the words after "go", without -o
	output  string   // the -o path
	ldflags string
}

var (
	builderImage = regexp.MustCompile(`^golang:(1\.[0-9]+)(\.[0-9]+)?-(bookworm|trixie|forky)$`)
	goDirective  = regexp.MustCompile(`(?m)^go (1\.[0-9]+)`)
	uidGID       = regexp.MustCompile(`^([0-9]+):([0-9]+)$`)
	credential   = regexp.MustCompile(`(?i)secret|token|passw|key|auth|credential`)
)

// loadDockerfile parses the Dockerfile and .dockerignore in repo, and
// derives the image for a build of t whose binary goes to binaryOut.
func loadDockerfile(repo string, t target, binaryOut string) (*dockerfile, error) {
	f, err := os.Open(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ast, err := parser.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("parse Dockerfile: %w", err)
	}
	stages, globalArgs, err := instructions.Parse(ast.AST, nil)
	if err != nil || len(stages) == 0 {
		return nil, fmt.Errorf("parse Dockerfile: %v (%d stages)", err, len(stages))
	}
	d := &dockerfile{repo: repo, globalArgs: globalArgs, stages: stages, final: &stages[len(stages)-1]}
	for _, s := range stages {
		for _, run := range commands[*instructions.RunCommand](&s) {
			// Evaluates the --mount flags, with their words as written.
			if err := run.Expand(func(word string) (string, error) { return word, nil }); err != nil {
				return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(run), err)
			}
		}
	}
	for _, c := range commands[*instructions.CopyCommand](d.final) {
		if i := slices.IndexFunc(stages, func(s instructions.Stage) bool { return c.From != "" && s.Name == c.From }); i >= 0 {
			d.builder = &stages[i]
		}
	}
	if d.builder == nil || d.builder == d.final {
		return nil, errors.New("the Dockerfile's final stage copies from no named build stage")
	}
	if d.context, err = buildContext(repo); err != nil {
		return nil, err
	}

	vars := []string{"TARGETOS=" + t.os, "TARGETARCH=" + t.arch, "VERSION=" + t.version}
	for _, run := range commands[*instructions.RunCommand](d.builder) {
		text := strings.Join(run.CmdLine, " ")
		if d.build, err = findGoBuild(text, nil, ast.EscapeToken); err != nil {
			return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(run), err)
		}
		if d.build != nil {
			d.build.line = line(run)
			x, _ := findGoBuild(text, vars, ast.EscapeToken)
			d.img.buildEnv = x.env
			d.img.buildArgs = append([]string{x.args[0], "-o", binaryOut}, x.args[1:]...)
			break
		}
	}
	for _, c := range commands[*instructions.CopyCommand](d.builder) {
		for _, src := range c.SourcePaths {
			for _, f := range d.context {
				if ok, _ := path.Match(src, f); ok && !slices.Contains(d.img.buildFiles, f) {
					d.img.buildFiles = append(d.img.buildFiles, f)
				}
			}
		}
	}

	lex := shell.NewLex(ast.EscapeToken)
	lex.SkipUnsetEnv = true // keep $NAME as written, so the check sees it
	for _, c := range d.final.Commands {
		switch c := c.(type) {
		case *instructions.EntrypointCommand:
			if d.entrypoint = c; len(c.CmdLine) == 1 {
				d.img.binary = c.CmdLine[0]
			}
		case *instructions.UserCommand:
			d.img.user = c.User
			if m := uidGID.FindStringSubmatch(c.User); m != nil {
				d.img.uid, _ = strconv.ParseInt(m[1], 10, 64)
				d.img.gid, _ = strconv.ParseInt(m[2], 10, 64)
			}
		case *instructions.ExposeCommand:
			d.ports = append(d.ports, c.Ports...)
		case *instructions.EnvCommand:
			for _, kv := range c.Env {
				value, _, err := lex.ProcessWord(kv.Value, shell.EnvsFromSlice(nil))
				if err != nil {
					return nil, fmt.Errorf("line %d of the Dockerfile: %w", line(c), err)
				}
				d.img.env = append(d.img.env, kv.Key+"="+value)
				if kv.Key == "CONFIG_PATH" {
					d.img.configPath = value
				}
			}
		}
	}
	if len(d.ports) == 1 {
		p, _ := strconv.ParseInt(strings.TrimSuffix(d.ports[0], "/tcp"), 10, 32)
		d.img.port = int32(p)
	}
	return d, nil
}

var dockerfileChecks = []check[*dockerfile]{
	{"builder: official Go image at go.mod's minor version, Debian variant, on $BUILDPLATFORM", func(d *dockerfile) (string, error) {
		m := builderImage.FindStringSubmatch(d.builder.BaseName)
		if m == nil {
			return "", fmt.Errorf("FROM %s, want golang:1.N-<debian release>", d.builder.BaseName)
		}
		goMod, err := os.ReadFile(filepath.Join(d.repo, "go.mod"))
		if err != nil {
			return "", err
		}
		if gm := goDirective.FindSubmatch(goMod); gm == nil || string(gm[1]) != m[1] {
			return "", fmt.Errorf("image Go %s, go.mod says %q", m[1], gm)
		}
		if d.builder.Platform != "$BUILDPLATFORM" {
			return "", fmt.Errorf("--platform=%q, want $BUILDPLATFORM (cross-compile, no emulation)", d.builder.Platform)
		}
		return d.builder.BaseName, nil
	}},
	{"builder: go mod download is a layer of its own, before the sources are copied", func(d *dockerfile) (string, error) {
		copied := false
		for _, c := range d.builder.Commands {
			switch c := c.(type) {
			case *instructions.CopyCommand:
				if copied || !slices.Equal(c.SourcePaths, []string{"go.mod", "go.sum"}) {
					return "", fmt.Errorf("line %d: %s before go mod download, want COPY go.mod go.sum first", line(c), c)
				}
				copied = true
			case *instructions.RunCommand:
				if strings.Contains(strings.Join(c.CmdLine, " "), "go mod download") {
					if !copied {
						return "", fmt.Errorf("line %d: go mod download before go.mod and go.sum are copied", line(c))
					}
					return fmt.Sprintf("line %d", line(c)), nil
				}
			}
		}
		return "", errors.New("no RUN go mod download")
	}},
	{`builder: CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -X main.version=$VERSION"`, func(d *dockerfile) (string, error) {
		b := d.build
		if b == nil {
			return "", errors.New("no RUN with go build in the build stage")
		}
		ld := strings.Fields(b.ldflags)
		for _, w := range []struct {
			in   []string
			want string
		}{
			{b.env, "CGO_ENABLED=0"}, {b.env, "GOOS=$TARGETOS"}, {b.env, "GOARCH=$TARGETARCH"}, {b.args, "-trimpath"},
			{ld, "-s"}, {ld, "-w"}, {ld, "-X"}, {ld, "main.version=$VERSION"},
		} {
			if !slices.Contains(w.in, w.want) {
				return "", fmt.Errorf("line %d: no %s in %q %q -ldflags %q", b.line, w.want, b.env, b.args, b.ldflags)
			}
		}
		var declared []string
		for _, a := range commands[*instructions.ArgCommand](d.builder) {
			for _, kv := range a.Args {
				declared = append(declared, kv.Key)
			}
		}
		for _, arg := range []string{"TARGETOS", "TARGETARCH", "VERSION"} {
			if !slices.Contains(declared, arg) {
				return "", fmt.Errorf("line %d: ARG %s is not declared in the build stage, so it would be empty", b.line, arg)
			}
		}
		if b.output == "" {
			return "", fmt.Errorf("line %d: go build has no -o", b.line)
		}
		if w := slices.IndexFunc(append(d.img.buildEnv, d.img.buildArgs...), func(w string) bool { return strings.Contains(w, "$") }); w >= 0 {
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
		for _, c := range commands[*instructions.CopyCommand](d.builder) {
			if c.DestPath != "./" && c.DestPath != "." {
				return "", fmt.Errorf("line %d: COPY to %q, want the WORKDIR ./", line(c), c.DestPath)
			}
			for _, src := range c.SourcePaths {
				if !slices.ContainsFunc(d.context, func(f string) bool { ok, _ := path.Match(src, f); return ok }) {
					return "", fmt.Errorf("line %d: %s matches nothing in the build context", line(c), src)
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
		for _, c := range commands[*instructions.CopyCommand](d.final) {
			if c.From != d.builder.Name || len(c.SourcePaths) != 1 {
				return "", fmt.Errorf("line %d: %s, want one file from stage %s", line(c), c, d.builder.Name)
			}
			copies = append(copies, c.SourcePaths[0]+" "+c.DestPath)
		}
		want := []string{caBundle + " " + caBundle}
		if d.build != nil {
			want = append(want, d.build.output+" "+d.img.binary)
		}
		slices.Sort(copies)
		if slices.Sort(want); !slices.Equal(copies, want) {
			return "", fmt.Errorf("copies %q, want %q", copies, want)
		}
		return strings.Join(copies, ", "), nil
	}},
	{"final stage: USER is a numeric non-root uid:gid", func(d *dockerfile) (string, error) {
		if !uidGID.MatchString(d.img.user) {
			return "", fmt.Errorf("USER %q, want numeric uid:gid", d.img.user)
		}
		if d.img.uid == 0 || d.img.gid == 0 {
			return "", fmt.Errorf("USER %s is root", d.img.user)
		}
		return d.img.user, nil
	}},
	{"final stage: EXPOSE one TCP port", func(d *dockerfile) (string, error) {
		if len(d.ports) != 1 || d.img.port == 0 {
			return "", fmt.Errorf("EXPOSE %v", d.ports)
		}
		return d.ports[0], nil
	}},
	{"final stage: ENV CONFIG_PATH is an absolute path", func(d *dockerfile) (string, error) {
		if e := slices.IndexFunc(d.img.env, func(e string) bool { return strings.Contains(e, "$") }); e >= 0 {
			return "", fmt.Errorf("ENV %s, want NAME=value without variables", d.img.env[e])
		}
		if !path.IsAbs(d.img.configPath) {
			return "", fmt.Errorf("CONFIG_PATH %q", d.img.configPath)
		}
		return d.img.configPath, nil
	}},
	{"no secrets: no ADD, no secret mount, no ARG or ENV named like a credential", func(d *dockerfile) (string, error) {
		all := []instructions.Command{}
		for i := range d.globalArgs {
			all = append(all, &d.globalArgs[i])
		}
		for _, s := range d.stages {
			all = append(all, s.Commands...)
		}
		for _, c := range all {
			var names []string
			switch c := c.(type) {
			case *instructions.AddCommand:
				return "", fmt.Errorf("line %d: %s", line(c), c)
			case *instructions.RunCommand:
				for _, m := range instructions.GetMounts(c) {
					if m.Type == instructions.MountTypeSecret {
						return "", fmt.Errorf("line %d: %s", line(c), c)
					}
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
			if i := slices.IndexFunc(names, credential.MatchString); i >= 0 {
				return "", fmt.Errorf("line %d: %s %s", line(c), c.Name(), names[i])
			}
		}
		return "", nil
	}},
}

// commands returns the instructions of type T in stage s.
func commands[T instructions.Command](s *instructions.Stage) []T {
	var out []T
	for _, c := range s.Commands {
		if c, ok := c.(T); ok {
			out = append(out, c)
		}
	}
	return out
}

// line is where c starts in the Dockerfile.
func line(c instructions.Command) int {
	if loc := c.Location(); len(loc) > 0 {
		return loc[0].Start.Line
	}
	return 0
}

// findGoBuild returns the go build among the commands of a RUN line (split
// at && || ;), its variables set from vars and any others left as written.
func findGoBuild(run string, vars []string, escape rune) (*goBuild, error) {
	lex := shell.NewLex(escape)
	lex.SkipUnsetEnv = true
	words, err := lex.ProcessWords(run, shell.EnvsFromSlice(vars))
	if err != nil {
		return nil, err
	}
	for len(words) > 0 {
		end := slices.IndexFunc(words, func(w string) bool { return w == "&&" || w == "||" || w == ";" })
		if end < 0 {
			end = len(words)
		}
		cmd := words[:end]
		words = words[min(end+1, len(words)):]
		j := 0
		for j < len(cmd) && strings.Contains(cmd[j], "=") && !strings.HasPrefix(cmd[j], "-") {
			j++
		}
		if j+1 >= len(cmd) || cmd[j] != "go" || cmd[j+1] != "build" {
			continue
		}
		b := &goBuild{env: cmd[:j]}
		for k := j + 1; k < len(cmd); k++ {
			name, value, hasValue := strings.Cut(cmd[k], "=")
			if (name == "-o" || name == "-ldflags") && !hasValue && k+1 < len(cmd) {
				k++
				value = cmd[k]
			}
			switch name {
			case "-o":
				b.output = value
			case "-ldflags":
				b.ldflags = value
				b.args = append(b.args, name, value)
			default:
				b.args = append(b.args, cmd[k])
			}
		}
		return b, nil
	}
	return nil, nil
}

// buildContext lists the repository files docker build would send, after
// .dockerignore, as slash-separated paths relative to repo.
func buildContext(repo string) ([]string, error) {
	f, err := os.Open(filepath.Join(repo, ".dockerignore"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	patterns, err := ignorefile.ReadAll(f)
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
		rel, err := filepath.Rel(repo, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		ignored, err := ignore.MatchesOrParentMatches(rel)
		// Docker always reads these two itself; COPY never sees them.
		if err == nil && !ignored && rel != "Dockerfile" && rel != ".dockerignore" {
			files = append(files, rel)
		}
		return err
	})
	return files, err
}
