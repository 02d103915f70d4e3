package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// repoRoot is the repository whose delivery files the tests break, copy by copy.
const repoRoot = "../.."

// edit replaces old with new in one file of a copied repository, or
// creates the file with new when old is empty.
type edit struct {
	file, old, new string
}

const (
	dep = "k8s/deployment.yaml"
	svc = "k8s/service.yaml"
	df  = "Dockerfile"
)

// breakCase breaks one invariant in a copy of the repository; want is the
// start of the FAIL line of the check that must catch it.
type breakCase struct {
	name  string
	edits []edit
	want  string
}

var breaks = []breakCase{
	{"sidecar container", []edit{{dep, "      volumes:\n", "        - name: proxy\n          image: ghcr.io/x/y:1\n      volumes:\n"}}, "exactly one container"},
	{"init container", []edit{{dep, "      containers:\n", "      initContainers:\n        - name: init\n          image: ghcr.io/x/y:1\n      containers:\n"}}, "exactly one container"},
	{"imagePullSecrets", []edit{{dep, "      containers:\n", "      imagePullSecrets:\n        - name: ghcr-pull\n      containers:\n"}}, "no imagePullSecrets"},
	{"secret env", []edit{{dep, "            - name: LOG_LEVEL\n", "            - name: TOKEN\n              valueFrom:\n                secretKeyRef: {name: s, key: k}\n            - name: LOG_LEVEL\n"}}, "no Secret"},
	{"Secret object", []edit{{"k8s/configmap.yaml", "apiVersion: v1\nkind: ConfigMap", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: v1\nkind: ConfigMap"}}, "no Secret"},
	{"secret.yaml listed", []edit{
		{"k8s/kustomization.yaml", "  - service.yaml\n", "  - service.yaml\n  - secret.yaml\n"},
		{"k8s/secret.yaml", "", "apiVersion: v1\nkind: Secret\nmetadata: {name: tailscale-authkey}\n"},
	}, "k8s/ holds exactly"},
	{"Ingress object", []edit{{svc, "apiVersion: v1\nkind: Service", "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec: {ingressClassName: tailscale}\n---\napiVersion: v1\nkind: Service"}}, "kubectl kustomize renders exactly"},
	{"commented secret in kustomization", []edit{{"k8s/kustomization.yaml", "  - service.yaml\n", "  - service.yaml\n# - secret.yaml\n"}}, "kustomization.yaml lists"},
	{"tailscale env", []edit{{dep, "            - name: LOG_LEVEL\n", "            - name: TAILSCALE_SOCKET\n              value: /var/run/tailscale/tailscaled.sock\n            - name: LOG_LEVEL\n"}}, "no tailscale"},
	{"tailscale volume", []edit{{dep, "      volumes:\n", "      volumes:\n        - name: tailscale-state\n          emptyDir: {}\n"}}, "no tailscale"},
	{"expose annotation off", []edit{{svc, `tailscale.com/expose: "true"`, `tailscale.com/expose: "false"`}}, "Service is a ClusterIP"},
	{"hostname annotation missing", []edit{{svc, `    tailscale.com/hostname: "anthropic-oauth-proxy"` + "\n", ""}}, "Service is a ClusterIP"},
	{"hostname not a DNS label", []edit{{svc, `tailscale.com/hostname: "anthropic-oauth-proxy"`, `tailscale.com/hostname: "Anthropic_OAuth_Proxy"`}}, "the Service hostname is a valid DNS label"},
	{"LoadBalancer", []edit{{svc, "type: ClusterIP", "type: LoadBalancer"}}, "Service is a ClusterIP"},
	{"service port", []edit{{svc, "port: 8080", "port: 80"}}, "the Service selects the pod"},
	{"service selector", []edit{{svc, "  selector:\n    app.kubernetes.io/name: anthropic-oauth-proxy", "  selector:\n    app.kubernetes.io/name: other"}}, "the Service selects the pod"},
	{"probe path", []edit{{dep, "          readinessProbe:\n            httpGet:\n              path: /health", "          readinessProbe:\n            httpGet:\n              path: /healthz"}}, "startup, readiness and liveness probes"},
	{"liveness probe missing", []edit{{dep, "          livenessProbe:\n            httpGet:\n              path: /health\n              port: http\n", "          livenessProbe:\n            tcpSocket:\n              port: http\n"}}, "startup, readiness and liveness probes"},
	{"container port", []edit{{dep, "containerPort: 8080", "containerPort: 9090"}}, "the container port is the config's listen port"},
	{"writable root filesystem", []edit{{dep, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"}}, "container security context"},
	{"privilege escalation", []edit{{dep, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"}}, "container security context"},
	{"capabilities kept", []edit{{dep, "                - ALL", "                - NET_RAW"}}, "container security context"},
	{"pod may run as root", []edit{{dep, "      securityContext:\n        runAsNonRoot: true", "      securityContext:\n        runAsNonRoot: false"}}, "pod security context"},
	{"pod seccomp", []edit{{dep, "        seccompProfile:\n          type: RuntimeDefault\n      containers:", "        seccompProfile:\n          type: Unconfined\n      containers:"}}, "pod security context"},
	{"user differs from image", []edit{{dep, "            runAsUser: 65532", "            runAsUser: 1000"}}, "container security context"},
	{"GOMEMLIMIT above limit", []edit{{dep, "value: 110MiB", "value: 130MiB"}}, "GOMEMLIMIT is below"},
	{"GOMEMLIMIT in Kubernetes units", []edit{{dep, "value: 110MiB", "value: 110Mi"}}, "GOMEMLIMIT is below"},
	{"GOMEMLIMIT missing", []edit{{dep, "            - name: GOMEMLIMIT\n              value: 110MiB\n", ""}}, "GOMEMLIMIT is below"},
	{"memory limit lowered", []edit{{dep, "memory: 128Mi", "memory: 100Mi"}}, "GOMEMLIMIT is below"},
	{"request above limit", []edit{{dep, "cpu: 50m", "cpu: 600m"}}, "CPU and memory requests"},
	{"preStop too long", []edit{{dep, "seconds: 3", "seconds: 6"}}, "preStop sleep"},
	{"grace period too short", []edit{{dep, "terminationGracePeriodSeconds: 10", "terminationGracePeriodSeconds: 8"}}, "preStop sleep"},
	{"no preStop", []edit{{dep, "            preStop:\n              sleep:\n                seconds: 3\n", "            postStart:\n              sleep:\n                seconds: 3\n"}}, "preStop sleep"},
	{"pod token mounted", []edit{{dep, "automountServiceAccountToken: false", "automountServiceAccountToken: true"}}, "automountServiceAccountToken"},
	{"service account token mounted", []edit{{"k8s/serviceaccount.yaml", "automountServiceAccountToken: false", "automountServiceAccountToken: true"}}, "automountServiceAccountToken"},
	{"prometheus port", []edit{{dep, `prometheus.io/port: "8080"`, `prometheus.io/port: "9090"`}}, "Prometheus annotations"},
	{"two replicas", []edit{{dep, "replicas: 1", "replicas: 2"}}, "Deployment runs one replica"},
	{"unavailable during rollout", []edit{{dep, "maxUnavailable: 0", "maxUnavailable: 1"}}, "Deployment runs one replica"},
	{"image without tag", []edit{{dep, "oauth-proxy:v0.1.0", "oauth-proxy"}}, "no imagePullSecrets; public image"},
	{"image latest", []edit{{dep, "oauth-proxy:v0.1.0", "oauth-proxy:latest"}}, "no imagePullSecrets; public image"},
	{"config args override", []edit{{dep, "          imagePullPolicy: IfNotPresent\n", "          imagePullPolicy: IfNotPresent\n          args: [-config, /x.toml]\n"}}, "no host namespaces"},
	{"mount path", []edit{{dep, "mountPath: /etc/anthropic-oauth-proxy", "mountPath: /config"}}, "the ConfigMap is mounted read-only"},
	{"mount writable", []edit{{dep, "              readOnly: true", "              readOnly: false"}}, "the ConfigMap is mounted read-only"},
	{"ConfigMap differs", []edit{{"k8s/configmap.yaml", "    timeout_secs = 60", "    timeout_secs = 61"}}, "the ConfigMap's config.toml is byte-identical"},
	{"example has a trailing blank line", []edit{{exampleConfig, `mode = "append"` + "\n", `mode = "append"` + "\n\n"}}, "the ConfigMap's config.toml is byte-identical"},
	{"listen port", []edit{{"k8s/configmap.yaml", `"0.0.0.0:8080"`, `"0.0.0.0:9090"`}, {exampleConfig, `"0.0.0.0:8080"`, `"0.0.0.0:9090"`}}, "the container port is the config's listen port"},
	{"pod security not enforced", []edit{{"k8s/namespace.yaml", "enforce: restricted", "enforce: baseline"}}, "Namespace enforces"},
	{"namespace", []edit{{"k8s/kustomization.yaml", "namespace: anthropic-oauth-proxy", "namespace: default"}}, "every object is in namespace"},
	{"misspelt field", []edit{{dep, "imagePullPolicy: IfNotPresent", "imagePulPolicy: IfNotPresent"}}, "every object decodes strictly"},
	{"field name in the wrong case", []edit{{dep, "revisionHistoryLimit: 5", "revisionHistorylimit: 5"}}, "every object decodes strictly"},
	{"unknown field in the Service", []edit{{svc, "  type: ClusterIP\n", "  type: ClusterIP\n  exposure: tailnet\n"}}, "every object decodes strictly"},

	{"builder Go version", []edit{{df, "golang:1.26-trixie", "golang:1.25-trixie"}}, "builder: official Go image"},
	{"builder floating tag", []edit{{df, "golang:1.26-trixie", "golang:latest"}}, "builder: official Go image"},
	{"builder emulated", []edit{{df, "--platform=$BUILDPLATFORM ", ""}}, "builder: official Go image"},
	{"no module layer", []edit{{df, "RUN go mod download\n", ""}}, "builder: go mod download"},
	{"sources before download", []edit{{df, "COPY go.mod go.sum ./\n", "COPY go.mod go.sum *.go ./\n"}}, "builder: go mod download"},
	{"cgo", []edit{{df, "RUN CGO_ENABLED=0", "RUN CGO_ENABLED=1"}}, "builder: CGO_ENABLED=0"},
	{"no trimpath", []edit{{df, "go build -trimpath", "go build"}}, "builder: CGO_ENABLED=0"},
	{"not stripped", []edit{{df, `"-s -w -X`, `"-X`}}, "builder: CGO_ENABLED=0"},
	{"no version", []edit{{df, ` -X main.version=$VERSION"`, `"`}}, "builder: CGO_ENABLED=0"},
	{"target ARG undeclared", []edit{{df, "ARG TARGETARCH\n", ""}}, "builder: CGO_ENABLED=0"},
	{"fixed GOARCH", []edit{{df, "GOARCH=$TARGETARCH", "GOARCH=amd64"}}, "builder: CGO_ENABLED=0"},
	{"test files in context", []edit{{".dockerignore", "*_test.go\n", ""}, {"extra_test.go", "", "package main\n"}}, ".dockerignore"},
	{"everything in context", []edit{{".dockerignore", "*\n", ""}}, ".dockerignore"},
	{"COPY from a missing path", []edit{{df, "COPY *.go ./", "COPY cmd/*.go ./"}}, "builder: every COPY source"},
	{"final stage with a shell", []edit{{df, "FROM scratch", "FROM debian:trixie-slim"}}, "final stage: FROM scratch"},
	{"RUN in final stage", []edit{{df, "USER 65532:65532", "RUN echo\nUSER 65532:65532"}}, "final stage: FROM scratch"},
	{"shell-form ENTRYPOINT", []edit{{df, `ENTRYPOINT ["/oauth-proxy"]`, `ENTRYPOINT /oauth-proxy`}}, "final stage: ENTRYPOINT"},
	{"no CA bundle", []edit{{df, "COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n", ""}}, "final stage: copies exactly"},
	{"extra file in image", []edit{{df, "USER 65532:65532", "COPY --from=build /bin/sh /bin/sh\nUSER 65532:65532"}}, "final stage: copies exactly"},
	{"named user", []edit{{df, "USER 65532:65532", "USER nonroot"}}, "final stage: USER"},
	{"root user", []edit{{df, "USER 65532:65532", "USER 0:0"}}, "final stage: USER"},
	{"image user differs from pod", []edit{{df, "USER 65532:65532", "USER 1000:1000"}}, "pod security context"},
	{"EXPOSE differs", []edit{{df, "EXPOSE 8080", "EXPOSE 9090"}}, "the container port is the config's listen port"},
	{"two ports exposed", []edit{{df, "EXPOSE 8080", "EXPOSE 8080 9090"}}, "final stage: EXPOSE"},
	{"relative CONFIG_PATH", []edit{{df, "ENV CONFIG_PATH=/etc/anthropic-oauth-proxy/config.toml", "ENV CONFIG_PATH=config.toml"}}, "final stage: ENV CONFIG_PATH"},
	{"CONFIG_PATH differs from mount", []edit{{df, "ENV CONFIG_PATH=/etc/anthropic-oauth-proxy/config.toml", "ENV CONFIG_PATH=/config.toml"}}, "the ConfigMap is mounted read-only"},
	{"credential ARG", []edit{{df, "ARG VERSION=dev", "ARG VERSION=dev\nARG GITHUB_TOKEN"}}, "no secrets"},
	{"ADD", []edit{{df, "COPY *.go ./", "COPY *.go ./\nADD https://example.com/x /x"}}, "no secrets"},
	{"secret mount", []edit{{df, "RUN go mod download", "RUN --mount=type=secret,id=netrc go mod download"}}, "no secrets"},
	{"credential global ARG", []edit{{df, "FROM --platform", "ARG NPM_TOKEN\nFROM --platform"}}, "no secrets"},
	{"ENV from a variable", []edit{{df, "ENV CONFIG_PATH=/etc/anthropic-oauth-proxy/config.toml", "ENV CONFIG_PATH=$HOME/config.toml"}}, "final stage: ENV CONFIG_PATH"},
}

// copyRepo copies the files the static checks read into a temporary directory.
func copyRepo(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, pattern := range []string{"*.go", "*.toml", "go.*", "Dockerfile", ".dockerignore", "k8s/*"} {
		files, _ := filepath.Glob(filepath.Join(repoRoot, pattern))
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil && fi.IsDir() {
				continue // k8s/monitoring is not part of the base
			}
			rel, _ := filepath.Rel(repoRoot, f)
			data, err := os.ReadFile(f)
			if err == nil {
				err = os.MkdirAll(filepath.Join(dir, filepath.Dir(rel)), 0o755)
			}
			if err == nil {
				err = os.WriteFile(filepath.Join(dir, rel), data, 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// runStatic renders dir/k8s with kubectl and runs the static checks on dir.
func runStatic(t *testing.T, dir string) (string, int) {
	t.Helper()
	cmd := exec.Command("kubectl", "kustomize", filepath.Join(dir, "k8s"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, stderr.Bytes())
	}
	rendered := filepath.Join(dir, "rendered.yaml")
	if err := os.WriteFile(rendered, out, 0o644); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	r := &report{w: &buf}
	if err := checkStatic(r, staticInput{
		repo: dir, rendered: rendered, out: t.TempDir(), binary: filepath.Join(dir, "oauth-proxy"),
		target: target{os: "linux", arch: "amd64", version: "test"},
	}); err != nil {
		t.Fatalf("checkStatic: %v\n%s", err, buf.String())
	}
	return buf.String(), r.failures
}

func TestStaticPasses(t *testing.T) {
	out, failures := runStatic(t, copyRepo(t))
	if failures != 0 {
		t.Fatalf("%d failures on the repository as it is:\n%s", failures, out)
	}
}

// TestStaticCatches breaks one thing at a time and expects the check named in
// want to fail.
func TestStaticCatches(t *testing.T) {
	for _, tt := range breaks {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel() // most of the time is spent waiting for kubectl
			dir := copyRepo(t)
			for _, e := range tt.edits {
				p, data := filepath.Join(dir, e.file), []byte(e.new)
				if e.old != "" {
					old, err := os.ReadFile(p)
					if err != nil || !bytes.Contains(old, []byte(e.old)) {
						t.Fatalf("%s does not contain %q (%v): the test no longer breaks anything", e.file, e.old, err)
					}
					data = bytes.Replace(old, []byte(e.old), data, 1)
				}
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			out, failures := runStatic(t, dir)
			if failures == 0 || !strings.Contains(out, "  FAIL "+tt.want) {
				t.Errorf("after %v: no FAIL line starting %q; output:\n%s", tt.edits, tt.want, out)
			}
		})
	}
}

// TestEveryInvariantIsBroken requires a case in breaks for every static check.
func TestEveryInvariantIsBroken(t *testing.T) {
	var whats []string
	for _, c := range dockerfileChecks {
		whats = append(whats, c.what)
	}
	for _, c := range manifestChecks {
		whats = append(whats, c.what)
	}
	for _, what := range whats {
		if !slices.ContainsFunc(breaks, func(b breakCase) bool { return strings.HasPrefix(what, b.want) }) {
			t.Errorf("no case in breaks breaks %q", what)
		}
	}
}

// TestBinaryCatches builds small programs the way the Dockerfile does, and
// not, and checks the binary checks tell them apart.
func TestBinaryCatches(t *testing.T) {
	dir := t.TempDir()
	for name, text := range map[string]string{"go.mod": "module stub\n\ngo 1.26\n", "main.go": "package main\n\nvar version = \"dev\"\n\nfunc main() { println(version) }\n", "empty.crt": ""} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ca, empty := "/etc/ssl/certs/ca-certificates.crt", filepath.Join(dir, "empty.crt")
	build := func(name string, env []string, args ...string) string {
		out := filepath.Join(dir, name)
		cmd := exec.Command("go", append([]string{"build", "-o", out}, args...)...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), env...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", name, err, b)
		}
		return out
	}
	// The stub needs no more than the runtime, so the builds stay quick; a
	// dynamically linked system program stands for a cgo build.
	static := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64"}
	good := build("good", static, "-trimpath", "-ldflags", "-s -w -X main.version=test", ".")
	symbols := build("symbols", static, "-trimpath", ".")
	paths := build("paths", static, "-ldflags", "-s -w", ".")
	dynamic, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, file, ca, arch string
		want                 []string // FAIL lines that must appear, none for a pass
	}{
		{"as the Dockerfile builds", good, ca, "amd64", nil},
		{"not stripped", symbols, ca, "amd64", []string{"stripped"}},
		{"no -trimpath", paths, ca, "amd64", []string{`build settings: CGO_ENABLED=0, -trimpath, the target's GOOS and GOARCH: -trimpath="", want "true"`}},
		{"dynamically linked", dynamic, ca, "amd64", []string{"ELF executable", "statically linked", "build settings"}},
		{"other architecture", good, ca, "arm64", []string{"ELF executable for the target platform", "build settings"}},
		{"empty CA bundle", good, empty, "amd64", []string{"the CA bundle"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			r := &report{w: &buf}
			checkBinary(r, tt.file, tt.ca, target{os: "linux", arch: tt.arch, version: "test"})
			out := buf.String()
			if r.failures != len(tt.want) {
				t.Errorf("%d failures, want %d", r.failures, len(tt.want))
			}
			for _, w := range tt.want {
				if !strings.Contains(out, "  FAIL "+w) {
					t.Errorf("no FAIL line starting %q", w)
				}
			}
			if t.Failed() {
				t.Logf("output:\n%s", out)
			}
		})
	}
}
