package main

import (
	"encoding/json"
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
)

// caBundle is where Go's crypto/x509 looks first for the system roots on Linux.
const caBundle = "/etc/ssl/certs/ca-certificates.crt"

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	line  int
	cmd   string            // upper case: FROM, COPY, RUN, ...
	flags map[string]string // leading --name=value options
	args  string            // the rest
}

// stage is one FROM and the instructions after it.
type stage struct {
	from                  instruction
	image, name, platform string
	insts                 []instruction
}

// parseDockerfile splits a Dockerfile into stages. It knows the syntax this
// repository uses: comments, "\" continuations, --flags, FROM ... AS name.
func parseDockerfile(data []byte) ([]stage, error) {
	var stages []stage
	lines := strings.Split(string(data), "\n")
	for i := 0; i < len(lines); i++ {
		text := strings.TrimSpace(lines[i])
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		start := i + 1
		for strings.HasSuffix(text, `\`) && i+1 < len(lines) {
			i++
			next := strings.TrimSpace(lines[i])
			if strings.HasPrefix(next, "#") {
				next = `\` // a comment inside a continued instruction is dropped
			}
			text = strings.TrimSuffix(text, `\`) + " " + next
		}
		text = strings.TrimSuffix(text, `\`)
		cmd, rest, _ := strings.Cut(text, " ")
		in := instruction{line: start, cmd: strings.ToUpper(cmd), flags: map[string]string{}}
		rest = strings.TrimSpace(rest)
		for strings.HasPrefix(rest, "--") {
			word, after, _ := strings.Cut(rest, " ")
			k, v, _ := strings.Cut(strings.TrimPrefix(word, "--"), "=")
			in.flags[k] = v
			rest = strings.TrimSpace(after)
		}
		in.args = rest
		if in.cmd == "FROM" {
			f := strings.Fields(rest)
			st := stage{from: in, platform: in.flags["platform"]}
			if len(f) > 0 {
				st.image = f[0]
			}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = f[2]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) == 0 {
			if in.cmd == "ARG" {
				continue // global build arguments before the first FROM
			}
			return nil, fmt.Errorf("line %d: %s before the first FROM", start, in.cmd)
		}
		stages[len(stages)-1].insts = append(stages[len(stages)-1].insts, in)
	}
	if len(stages) == 0 {
		return nil, errors.New("no FROM")
	}
	return stages, nil
}

// identRE matches a shell variable name.
var identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// shellWords splits a shell command line into words the way sh would for
// this repository's RUN lines: quotes, backslashes, $NAME and ${NAME}
// (resolved by expand) and the operators && || ; as words of their own.
func shellWords(s string, expand func(name string) (string, error)) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	flush := func() {
		if inWord {
			words = append(words, cur.String())
			cur.Reset()
			inWord = false
		}
	}
	// variable reads a $NAME or ${NAME} at s[i] and returns the index of its last byte.
	variable := func(i int) (int, error) {
		var name string
		end := i
		if i+1 < len(s) && s[i+1] == '{' {
			k := strings.IndexByte(s[i:], '}')
			if k < 0 {
				return 0, errors.New("unterminated ${")
			}
			name, end = s[i+2:i+k], i+k
		} else {
			j := i + 1
			for j < len(s) && (s[j] == '_' || s[j] >= 'a' && s[j] <= 'z' || s[j] >= 'A' && s[j] <= 'Z' || s[j] >= '0' && s[j] <= '9') {
				j++
			}
			name, end = s[i+1:j], j-1
		}
		if name == "" {
			cur.WriteByte('$')
			return i, nil
		}
		if !identRE.MatchString(name) {
			return 0, fmt.Errorf("unsupported expansion ${%s}", name)
		}
		v, err := expand(name)
		if err != nil {
			return 0, err
		}
		cur.WriteString(v)
		return end, nil
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		var err error
		switch {
		case ch == ' ' || ch == '\t' || ch == '\n':
			flush()
		case strings.HasPrefix(s[i:], "&&") || strings.HasPrefix(s[i:], "||"):
			flush()
			words = append(words, s[i:i+2])
			i++
		case ch == ';':
			flush()
			words = append(words, ";")
		case ch == '\'':
			k := strings.IndexByte(s[i+1:], '\'')
			if k < 0 {
				return nil, errors.New("unterminated single quote")
			}
			cur.WriteString(s[i+1 : i+1+k])
			inWord = true
			i += k + 1
		case ch == '"':
			inWord = true
			for i++; i < len(s) && s[i] != '"'; i++ {
				switch {
				case s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0:
					cur.WriteByte(s[i+1])
					i++
				case s[i] == '$':
					if i, err = variable(i); err != nil {
						return nil, err
					}
				default:
					cur.WriteByte(s[i])
				}
			}
			if i >= len(s) {
				return nil, errors.New("unterminated double quote")
			}
		case ch == '\\' && i+1 < len(s):
			cur.WriteByte(s[i+1])
			inWord = true
			i++
		case ch == '$':
			inWord = true
			if i, err = variable(i); err != nil {
				return nil, err
			}
		default:
			cur.WriteByte(ch)
			inWord = true
		}
	}
	flush()
	return words, nil
}

// keepVariables is an expand function that leaves $NAME as written, so the
// checks can read the Dockerfile's own words.
func keepVariables(name string) (string, error) { return "$" + name, nil }

// goBuild is the go build command of a RUN line.
type goBuild struct {
	env     []string // NAME=value words before "go"
	args    []string // the words after "go", without -o
	output  string   // the -o path
	ldflags string
}

// findGoBuild returns the "go build" command among the &&-separated commands of a RUN line.
func findGoBuild(run string, expand func(string) (string, error)) (*goBuild, error) {
	words, err := shellWords(run, expand)
	if err != nil {
		return nil, err
	}
	for cmd := range splitCommands(words) {
		j := 0
		for j < len(cmd) && strings.Contains(cmd[j], "=") && !strings.HasPrefix(cmd[j], "-") {
			j++
		}
		if j+1 >= len(cmd) || cmd[j] != "go" || cmd[j+1] != "build" {
			continue
		}
		b := &goBuild{env: cmd[:j]}
		rest := cmd[j+1:]
		for k := 0; k < len(rest); k++ {
			w := rest[k]
			switch {
			case w == "-o" && k+1 < len(rest):
				b.output = rest[k+1]
				k++
				continue
			case strings.HasPrefix(w, "-o="):
				b.output = strings.TrimPrefix(w, "-o=")
				continue
			case w == "-ldflags" && k+1 < len(rest):
				b.ldflags = rest[k+1]
			case strings.HasPrefix(w, "-ldflags="):
				b.ldflags = strings.TrimPrefix(w, "-ldflags=")
			}
			b.args = append(b.args, w)
		}
		return b, nil
	}
	return nil, nil
}

// splitCommands yields the commands of a word list split at && || and ;.
func splitCommands(words []string) func(func([]string) bool) {
	return func(yield func([]string) bool) {
		start := 0
		for i := 0; i <= len(words); i++ {
			if i == len(words) || words[i] == "&&" || words[i] == "||" || words[i] == ";" {
				if i > start && !yield(words[start:i]) {
					return
				}
				start = i + 1
			}
		}
	}
}

// imagePlan tells .ci/delivery how to rebuild and run the image without Docker.
type imagePlan struct {
	buildFiles []string // context files the builder copies into its WORKDIR
	buildEnv   []string // NAME=value for go build, expanded for the target
	buildArgs  []string // arguments after "go", expanded, with -o at the requested path
	binary     string   // the ENTRYPOINT binary's path in the image
	user       string   // uid:gid
	env        []string // the final stage's ENV, NAME=value
}

// checkDockerfile checks the Dockerfile and .dockerignore in repo and
// returns the plan for a build of target whose binary goes to binaryOut.
func checkDockerfile(r *report, repo string, t target, binaryOut string) (imagePlan, imageFacts, error) {
	var plan imagePlan
	var facts imageFacts
	data, err := os.ReadFile(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		return plan, facts, err
	}
	stages, err := parseDockerfile(data)
	if err != nil {
		return plan, facts, fmt.Errorf("parse Dockerfile: %v", err)
	}
	final := stages[len(stages)-1]
	var builder *stage
	for _, in := range final.insts {
		if from := in.flags["from"]; in.cmd == "COPY" && from != "" {
			for i := range stages[:len(stages)-1] {
				if stages[i].name == from {
					builder = &stages[i]
				}
			}
		}
	}
	if builder == nil {
		return plan, facts, errors.New("the Dockerfile's final stage copies from no named build stage")
	}
	context, err := buildContext(repo)
	if err != nil {
		return plan, facts, err
	}

	r.check("builder: official Go image at go.mod's minor version, Debian variant, on $BUILDPLATFORM", func() (string, error) {
		m := regexp.MustCompile(`^golang:(1\.[0-9]+)(\.[0-9]+)?-(bookworm|trixie|forky)$`).FindStringSubmatch(builder.image)
		if m == nil {
			return "", fmt.Errorf("FROM %s, want golang:1.N-<debian release>", builder.image)
		}
		goMod, err := os.ReadFile(filepath.Join(repo, "go.mod"))
		if err != nil {
			return "", err
		}
		gm := regexp.MustCompile(`(?m)^go (1\.[0-9]+)`).FindSubmatch(goMod)
		if gm == nil || string(gm[1]) != m[1] {
			return "", fmt.Errorf("image Go %s, go.mod says %q", m[1], gm)
		}
		if builder.platform != "$BUILDPLATFORM" {
			return "", fmt.Errorf("--platform=%q, want $BUILDPLATFORM (cross-compile, no emulation)", builder.platform)
		}
		return builder.image, nil
	})
	r.check("builder: go mod download is a layer of its own, before the sources are copied", func() (string, error) {
		copiedModules := false
		for _, in := range builder.insts {
			switch {
			case in.cmd == "COPY" && !copiedModules:
				if srcs, _ := copyArgs(in); !slices.Equal(srcs, []string{"go.mod", "go.sum"}) {
					return "", fmt.Errorf("line %d: the first COPY copies %v, want go.mod go.sum", in.line, srcs)
				}
				copiedModules = true
			case in.cmd == "COPY":
				return "", fmt.Errorf("line %d: COPY before go mod download", in.line)
			case in.cmd == "RUN" && strings.Contains(in.args, "go mod download"):
				if !copiedModules {
					return "", fmt.Errorf("line %d: go mod download before go.mod and go.sum are copied", in.line)
				}
				return fmt.Sprintf("line %d", in.line), nil
			}
		}
		return "", errors.New("no RUN go mod download")
	})
	var build *goBuild
	r.check(`builder: CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -X main.version=$VERSION"`, func() (string, error) {
		declared := map[string]bool{}
		for _, in := range builder.insts {
			if in.cmd == "ARG" {
				for _, a := range strings.Fields(in.args) {
					name, _, _ := strings.Cut(a, "=")
					declared[name] = true
				}
			}
			if in.cmd != "RUN" {
				continue
			}
			b, err := findGoBuild(in.args, keepVariables)
			if err != nil {
				return "", fmt.Errorf("line %d: %v", in.line, err)
			}
			if b == nil {
				continue
			}
			build = b
			for _, want := range []string{"CGO_ENABLED=0", "GOOS=$TARGETOS", "GOARCH=$TARGETARCH"} {
				if !slices.Contains(b.env, want) {
					return "", fmt.Errorf("line %d: the go build environment %v lacks %s", in.line, b.env, want)
				}
			}
			if !slices.Contains(b.args, "-trimpath") {
				return "", fmt.Errorf("line %d: no -trimpath", in.line)
			}
			ld := strings.Fields(b.ldflags)
			if !slices.Contains(ld, "-s") || !slices.Contains(ld, "-w") || !slices.Contains(ld, "-X") || !slices.Contains(ld, "main.version=$VERSION") {
				return "", fmt.Errorf("line %d: -ldflags %q, want -s -w -X main.version=$VERSION", in.line, b.ldflags)
			}
			for _, arg := range []string{"TARGETOS", "TARGETARCH", "VERSION"} {
				if !declared[arg] {
					return "", fmt.Errorf("line %d: ARG %s is not declared in the build stage, so it would be empty", in.line, arg)
				}
			}
			if b.output == "" {
				return "", fmt.Errorf("line %d: go build has no -o", in.line)
			}
			vars := map[string]string{"TARGETOS": t.os, "TARGETARCH": t.arch, "VERSION": t.version}
			expanded, err := findGoBuild(in.args, func(name string) (string, error) {
				v, ok := vars[name]
				if !ok {
					return "", fmt.Errorf("the go build line uses $%s, which the reproduction does not set", name)
				}
				return v, nil
			})
			if err != nil {
				return "", fmt.Errorf("line %d: %v", in.line, err)
			}
			plan.buildEnv = expanded.env
			plan.buildArgs = append([]string{expanded.args[0], "-o", binaryOut}, expanded.args[1:]...)
			return fmt.Sprintf("line %d", in.line), nil
		}
		return "", errors.New("no RUN with go build in the build stage")
	})
	r.check(".dockerignore: the build context holds only go.mod, go.sum and non-test Go sources", func() (string, error) {
		for _, f := range context {
			if f != "go.mod" && f != "go.sum" && (path.Dir(f) != "." || !strings.HasSuffix(f, ".go") || strings.HasSuffix(f, "_test.go")) {
				return "", fmt.Errorf("%s would be sent to the builder", f)
			}
		}
		return fmt.Sprintf("%d files", len(context)), nil
	})
	r.check("builder: every COPY source is in the build context", func() (string, error) {
		for _, in := range builder.insts {
			if in.cmd != "COPY" {
				continue
			}
			srcs, dst := copyArgs(in)
			if dst != "./" && dst != "." {
				return "", fmt.Errorf("line %d: COPY to %q, want the WORKDIR ./", in.line, dst)
			}
			for _, src := range srcs {
				n := 0
				for _, c := range context {
					if ok, _ := path.Match(src, c); ok {
						n++
						if !slices.Contains(plan.buildFiles, c) {
							plan.buildFiles = append(plan.buildFiles, c)
						}
					}
				}
				if n == 0 {
					return "", fmt.Errorf("line %d: %s matches nothing in the build context", in.line, src)
				}
			}
		}
		return strings.Join(plan.buildFiles, " "), nil
	})
	r.check("final stage: FROM scratch, only COPY USER EXPOSE ENV ENTRYPOINT LABEL", func() (string, error) {
		if final.image != "scratch" {
			return "", fmt.Errorf("FROM %s", final.image)
		}
		for _, in := range final.insts {
			if !slices.Contains([]string{"COPY", "USER", "EXPOSE", "ENV", "ENTRYPOINT", "LABEL"}, in.cmd) {
				return "", fmt.Errorf("line %d: %s", in.line, in.cmd)
			}
		}
		return "", nil
	})
	r.check("final stage: ENTRYPOINT is the exec form of one binary (scratch has no shell)", func() (string, error) {
		var ep []string
		for _, in := range final.insts {
			if in.cmd == "ENTRYPOINT" {
				if err := json.Unmarshal([]byte(in.args), &ep); err != nil {
					return "", fmt.Errorf("line %d: %s is the shell form, which needs /bin/sh", in.line, in.args)
				}
			}
		}
		if len(ep) != 1 || !path.IsAbs(ep[0]) {
			return "", fmt.Errorf("ENTRYPOINT %q, want [\"/<binary>\"]", ep)
		}
		plan.binary = ep[0]
		return plan.binary, nil
	})
	r.check("final stage: copies exactly the built binary and the CA bundle from the builder", func() (string, error) {
		var copies []string
		for _, in := range final.insts {
			if in.cmd != "COPY" {
				continue
			}
			srcs, dst := copyArgs(in)
			if in.flags["from"] != builder.name || len(srcs) != 1 {
				return "", fmt.Errorf("line %d: COPY %s, want one file from stage %s", in.line, in.args, builder.name)
			}
			copies = append(copies, srcs[0]+" "+dst)
		}
		var want []string
		if build != nil {
			want = append(want, build.output+" "+plan.binary)
		}
		want = append(want, caBundle+" "+caBundle)
		slices.Sort(copies)
		slices.Sort(want)
		if !slices.Equal(copies, want) {
			return "", fmt.Errorf("copies %q, want %q", copies, want)
		}
		return strings.Join(copies, ", "), nil
	})
	r.check("final stage: USER is a numeric non-root uid:gid", func() (string, error) {
		for _, in := range final.insts {
			if in.cmd == "USER" {
				plan.user = in.args
			}
		}
		m := regexp.MustCompile(`^([0-9]+):([0-9]+)$`).FindStringSubmatch(plan.user)
		if m == nil {
			return "", fmt.Errorf("USER %q, want numeric uid:gid", plan.user)
		}
		facts.uid, _ = strconv.ParseInt(m[1], 10, 64)
		facts.gid, _ = strconv.ParseInt(m[2], 10, 64)
		if facts.uid == 0 || facts.gid == 0 {
			return "", fmt.Errorf("USER %s is root", plan.user)
		}
		return plan.user, nil
	})
	r.check("final stage: EXPOSE one TCP port", func() (string, error) {
		var ports []string
		for _, in := range final.insts {
			if in.cmd == "EXPOSE" {
				ports = append(ports, strings.Fields(in.args)...)
			}
		}
		if len(ports) != 1 {
			return "", fmt.Errorf("EXPOSE %v", ports)
		}
		p, err := strconv.Atoi(strings.TrimSuffix(ports[0], "/tcp"))
		if err != nil {
			return "", fmt.Errorf("EXPOSE %s", ports[0])
		}
		facts.port = p
		return ports[0], nil
	})
	r.check("final stage: ENV CONFIG_PATH is an absolute path", func() (string, error) {
		for _, in := range final.insts {
			if in.cmd != "ENV" {
				continue
			}
			words, err := shellWords(in.args, keepVariables)
			if err != nil {
				return "", fmt.Errorf("line %d: %v", in.line, err)
			}
			if len(words) == 2 && !strings.Contains(words[0], "=") {
				words = []string{words[0] + "=" + words[1]} // legacy ENV NAME value
			}
			for _, w := range words {
				name, value, ok := strings.Cut(w, "=")
				if !ok || strings.Contains(value, "$") {
					return "", fmt.Errorf("line %d: ENV %s, want NAME=value without variables", in.line, w)
				}
				plan.env = append(plan.env, w)
				if name == "CONFIG_PATH" {
					facts.configPath = value
				}
			}
		}
		if !path.IsAbs(facts.configPath) {
			return "", fmt.Errorf("CONFIG_PATH %q", facts.configPath)
		}
		return facts.configPath, nil
	})
	r.check("no secrets: no ADD, no secret mount, no ARG or ENV named like a credential", func() (string, error) {
		credential := regexp.MustCompile(`(?i)secret|token|passw|key|auth|credential`)
		for _, st := range stages {
			for _, in := range st.insts {
				if in.cmd == "ADD" || in.flags["mount"] != "" && strings.Contains(in.flags["mount"], "secret") {
					return "", fmt.Errorf("line %d: %s %s", in.line, in.cmd, in.args)
				}
				if in.cmd == "ARG" || in.cmd == "ENV" {
					for _, w := range strings.Fields(in.args) {
						if name, _, _ := strings.Cut(w, "="); credential.MatchString(name) {
							return "", fmt.Errorf("line %d: %s %s", in.line, in.cmd, name)
						}
					}
				}
			}
		}
		return "", nil
	})
	return plan, facts, nil
}

// copyArgs returns the sources and the destination of a COPY.
func copyArgs(in instruction) (srcs []string, dst string) {
	f := strings.Fields(in.args)
	if len(f) < 2 {
		return nil, ""
	}
	return f[:len(f)-1], f[len(f)-1]
}

// buildContext lists the repository files docker build would send, after
// .dockerignore, as slash-separated paths relative to repo.
func buildContext(repo string) ([]string, error) {
	data, err := os.ReadFile(filepath.Join(repo, ".dockerignore"))
	if err != nil {
		return nil, err
	}
	type rule struct {
		pattern string
		negate  bool
	}
	var rules []rule
	for line := range strings.Lines(string(data)) {
		p := strings.TrimSpace(line)
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		ru := rule{}
		if p, ru.negate = strings.CutPrefix(p, "!"); strings.Contains(p, "**") {
			return nil, fmt.Errorf(".dockerignore: %q: ** patterns are not reproduced here", p)
		}
		ru.pattern = path.Clean(strings.TrimPrefix(p, "/"))
		rules = append(rules, ru)
	}
	// Docker's rule: the last pattern matching the path or one of its parent
	// directories decides.
	excluded := func(rel string) bool {
		ex := false
		for _, ru := range rules {
			for p := rel; p != "."; p = path.Dir(p) {
				if ok, _ := path.Match(ru.pattern, p); ok {
					ex = !ru.negate
					break
				}
			}
		}
		return ex
	}
	var files []string
	err = filepath.WalkDir(repo, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(repo, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		// Docker always reads these two itself; COPY never sees them.
		if rel != "Dockerfile" && rel != ".dockerignore" && !excluded(rel) {
			files = append(files, rel)
		}
		return nil
	})
	return files, err
}
