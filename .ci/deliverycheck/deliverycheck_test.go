package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// repoRoot is the repository whose delivery files the tests break, copy by copy.
const repoRoot = "../.."

const (
	dep = "k8s/deployment.yaml"
	svc = "k8s/service.yaml"
	cm  = "k8s/configmap.yaml"
	ks  = "k8s/kustomization.yaml"
	df  = "Dockerfile"
)

// edit replaces the first old with new in file, or creates file with new
// when old is empty.
type edit struct{ file, old, new string }

// breakCase breaks one invariant in a copy of the repository; want is the
// start of the check that must then fail.
type breakCase struct {
	name  string
	edits []edit
	want  string
}

// replace is the common break: one replacement in one file.
func replace(name, file, old, new, want string) breakCase {
	return breakCase{name, []edit{{file, old, new}}, want}
}

var breaks = []breakCase{
	replace("builder Go version", df, "golang:1.26", "golang:1.25", "builder: golang"),
	replace("builder floating tag", df, "golang:1.26-trixie", "golang:latest", "builder: golang"),
	replace("builder emulated", df, "--platform=$BUILDPLATFORM ", "", "builder: golang"),
	replace("no module layer", df, "RUN go mod download\n", "", "builder: go mod download"),
	replace("sources before download", df, "COPY go.mod go.sum ./", "COPY go.mod go.sum *.go ./", "builder: go mod"),
	replace("cgo", df, "RUN CGO_ENABLED=0", "RUN CGO_ENABLED=1", "builder: CGO_ENABLED=0"),
	replace("no trimpath", df, "go build -trimpath", "go build", "builder: CGO_ENABLED=0"),
	replace("not stripped", df, `"-s -w -X`, `"-X`, "builder: CGO_ENABLED=0"),
	replace("no version", df, ` -X main.version=$VERSION"`, `"`, "builder: CGO_ENABLED=0"),
	replace("target ARG undeclared", df, "ARG TARGETARCH\n", "", "builder: CGO_ENABLED=0"),
	replace("fixed GOARCH", df, "GOARCH=$TARGETARCH", "GOARCH=amd64", "builder: CGO_ENABLED=0"),
	{"test files in context", []edit{{".dockerignore", "*_test.go\n", ""}, {"extra_test.go", "", "package main\n"}},
		".dockerignore"},
	replace("everything in context", ".dockerignore", "*\n", "", ".dockerignore"),
	replace("COPY from a missing path", df, "COPY *.go ./", "COPY cmd/*.go ./", "builder: every COPY source"),
	replace("final stage with a shell", df, "FROM scratch", "FROM debian:trixie-slim", "final stage: FROM scratch"),
	replace("RUN in final stage", df, "USER 65532", "RUN echo\nUSER 65532", "final stage: FROM scratch"),
	replace("shell-form ENTRYPOINT", df, `["/oauth-proxy"]`, "/oauth-proxy", "final stage: ENTRYPOINT"),
	replace("no CA bundle", df, "COPY --from=build /etc/ssl/", "# COPY --from=build /etc/ssl/", "final stage: copies"),
	replace("extra file in image", df, "USER 65532", "COPY --from=build /bin/sh /\nUSER 65532", "final stage: copies"),
	replace("named user", df, "USER 65532:65532", "USER nonroot", "final stage: USER"),
	replace("root user", df, "USER 65532:65532", "USER 0:0", "final stage: USER"),
	replace("two ports exposed", df, "EXPOSE 8080", "EXPOSE 8080 9090", "final stage: EXPOSE"),
	replace("relative CONFIG_PATH", df, "CONFIG_PATH=/etc/", "CONFIG_PATH=etc/", "final stage: ENV CONFIG_PATH"),
	replace("ENV from a variable", df, "CONFIG_PATH=/etc/", "CONFIG_PATH=$HOME/etc/", "final stage: ENV CONFIG_PATH"),
	replace("credential ARG", df, "ARG VERSION=dev", "ARG VERSION=dev\nARG GITHUB_TOKEN", "no secrets"),
	replace("credential global ARG", df, "FROM --platform", "ARG NPM_TOKEN\nFROM --platform", "no secrets"),
	replace("ADD", df, "COPY *.go ./", "COPY *.go ./\nADD https://example.com/x /x", "no secrets"),
	replace("secret mount", df, "RUN go mod", "RUN --mount=type=secret,id=netrc go mod", "no secrets"),

	{"secret.yaml listed", []edit{{ks, "  - service.yaml\n", "  - service.yaml\n  - secret.yaml\n"},
		{"k8s/secret.yaml", "", "apiVersion: v1\nkind: Secret\nmetadata: {name: tailscale-authkey}\n"}}, "k8s/ holds"},
	replace("commented secret", ks, "  - service.yaml\n", "  - service.yaml\n# - secret.yaml\n", "kustomization.yaml"),
	replace("Ingress object", svc, "apiVersion: v1\nkind: Service", "apiVersion: networking.k8s.io/v1\nkind: Ingress\n"+
		"metadata: {name: i}\nspec: {ingressClassName: tailscale}\n---\napiVersion: v1\nkind: Service", "renders exactly"),
	replace("misspelt field", dep, "imagePullPolicy:", "imagePulPolicy:", "every object decodes strictly"),
	replace("field in the wrong case", dep, "revisionHistoryLimit:", "revisionHistorylimit:", "every object decodes"),
	replace("unknown field", svc, "type: ClusterIP\n", "type: ClusterIP\n  exposure: tailnet\n", "every object decodes"),
	replace("secret env", dep, "value: info", "valueFrom: {secretKeyRef: {name: s, key: k}}", "no Secret"),
	replace("Secret object", cm, "kind: ConfigMap",
		"kind: Secret\nmetadata: {name: s}\n---\napiVersion: v1\nkind: ConfigMap", "no Secret"),
	replace("namespace", ks, "namespace: anthropic-oauth-proxy", "namespace: default", "every object is in namespace"),
	replace("baseline security", "k8s/namespace.yaml", "enforce: restricted", "enforce: baseline", "Namespace enforces"),
	replace("two replicas", dep, "replicas: 1", "replicas: 2", "Deployment runs one replica"),
	replace("unavailable in a rollout", dep, "maxUnavailable: 0", "maxUnavailable: 1", "Deployment runs one replica"),
	replace("sidecar", dep, "      volumes:", "        - {name: x, image: x:1}\n      volumes:", "exactly one container"),
	replace("init container", dep, "      containers:",
		"      initContainers: [{name: init, image: x:1}]\n      containers:", "exactly one container"),
	replace("imagePullSecrets", dep, "      containers:", "      imagePullSecrets: [{name: ghcr-pull}]\n      containers:",
		"no imagePullSecrets"),
	replace("image without tag", dep, "oauth-proxy:v0.1.0", "oauth-proxy", "no imagePullSecrets; public image"),
	replace("image latest", dep, "oauth-proxy:v0.1.0", "oauth-proxy:latest", "no imagePullSecrets; public image"),
	replace("tailscale env", dep, "name: LOG_LEVEL", "name: TAILSCALE_SOCKET", "the Deployment never names"),
	replace("tailscale volume", dep, "      volumes:\n", "      volumes:\n        - {name: tailscale, emptyDir: {}}\n",
		"the Deployment never names"),
	replace("args override", dep, "          imagePullPolicy:",
		"          args: [-config, /x]\n          imagePullPolicy:", "no host namespaces"),
	replace("container port", dep, "containerPort: 8080", "containerPort: 9090", "the container port is"),
	{"listen port", []edit{{cm, `"0.0.0.0:8080"`, `"0.0.0.0:9090"`}, {exampleConfig, `"0.0.0.0:8080"`, `"0.0.0.0:9090"`}},
		"the container port is"},
	replace("EXPOSE differs", df, "EXPOSE 8080", "EXPOSE 9090", "the container port is"),
	replace("probe path", dep, "readinessProbe:\n            httpGet:\n              path: /health",
		"readinessProbe:\n            httpGet:\n              path: /healthz", "startup, readiness and liveness probes"),
	replace("liveness probe not HTTP", dep, "livenessProbe:\n            httpGet:\n              path: /health\n",
		"livenessProbe:\n            tcpSocket:\n", "startup, readiness and liveness probes"),
	replace("pod may run as root", dep, "\n        runAsNonRoot: true", "\n        runAsNonRoot: false", "pod security"),
	replace("pod seccomp", dep, "RuntimeDefault\n      containers:", "Unconfined\n      containers:", "pod security"),
	replace("image user differs", df, "USER 65532:65532", "USER 1000:1000", "pod security context"),
	replace("user differs from image", dep, "            runAsUser: 65532", "            runAsUser: 1000",
		"container security context"),
	replace("writable root", dep, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "container security"),
	replace("privilege escalation", dep, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true",
		"container security context"),
	replace("capabilities kept", dep, "- ALL", "- NET_RAW", "container security context"),
	replace("request above limit", dep, "cpu: 50m", "cpu: 600m", "CPU and memory requests"),
	replace("GOMEMLIMIT above limit", dep, "value: 110MiB", "value: 130MiB", "GOMEMLIMIT is below"),
	replace("GOMEMLIMIT in k8s units", dep, "value: 110MiB", "value: 110Mi", "GOMEMLIMIT is below"),
	replace("GOMEMLIMIT missing", dep, "name: GOMEMLIMIT", "name: GOGC", "GOMEMLIMIT is below"),
	replace("memory limit lowered", dep, "memory: 128Mi", "memory: 100Mi", "GOMEMLIMIT is below"),
	replace("preStop too long", dep, "seconds: 3", "seconds: 6", "preStop sleep"),
	replace("grace period too short", dep, "GracePeriodSeconds: 10", "GracePeriodSeconds: 8", "preStop sleep"),
	replace("no preStop", dep, "preStop:", "postStart:", "preStop sleep"),
	replace("pod token", dep, "automountServiceAccountToken: false", "automountServiceAccountToken: true", "automount"),
	replace("service account token", "k8s/serviceaccount.yaml", "automountServiceAccountToken: false",
		"automountServiceAccountToken: true", "automountServiceAccountToken"),
	replace("prometheus port", dep, `prometheus.io/port: "8080"`, `prometheus.io/port: "9090"`, "Prometheus annotations"),
	replace("mount path", dep, "mountPath: /etc/anthropic-oauth-proxy", "mountPath: /config", "the ConfigMap is mounted"),
	replace("mount writable", dep, "readOnly: true", "readOnly: false", "the ConfigMap is mounted"),
	replace("CONFIG_PATH elsewhere", df, "CONFIG_PATH=/etc/anthropic-oauth-proxy/", "CONFIG_PATH=/",
		"the ConfigMap is mounted"),
	replace("ConfigMap differs", cm, "timeout_secs = 60", "timeout_secs = 61", "the ConfigMap's config.toml"),
	replace("example has a trailing blank line", exampleConfig, `mode = "append"`+"\n", `mode = "append"`+"\n\n",
		"the ConfigMap's config.toml"),
	replace("expose annotation off", svc, `expose: "true"`, `expose: "false"`, "Service: a ClusterIP"),
	replace("hostname annotation missing", svc, `    tailscale.com/hostname: "anthropic-oauth-proxy"`+"\n", "",
		"Service: a ClusterIP"),
	replace("LoadBalancer", svc, "type: ClusterIP", "type: LoadBalancer", "Service: a ClusterIP"),
	replace("hostname not a DNS label", svc, `hostname: "anthropic-oauth-proxy"`, `hostname: "Anthropic_OAuth_Proxy"`,
		"the Service hostname"),
	replace("service port", svc, "port: 8080", "port: 80", "the Service selects the pod"),
	replace("service selector", svc, "selector:\n    app.kubernetes.io/name: anthropic-oauth-proxy",
		"selector:\n    app.kubernetes.io/name: other", "the Service selects the pod"),
}

// copyRepo copies the files the static checks read into a temporary directory.
func copyRepo(t *testing.T) string {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "k8s"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, pattern := range []string{"*.go", "*.toml", "go.*", "Dockerfile", ".dockerignore", "k8s/*.yaml"} {
		files, _ := filepath.Glob(filepath.Join(repoRoot, pattern))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err == nil {
				err = os.WriteFile(filepath.Join(dir, strings.TrimPrefix(f, repoRoot)), data, 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// runStatic renders dir/k8s with kubectl and returns what the static checks
// print about dir.
func runStatic(t *testing.T, dir string) string {
	var rendered, out, stderr bytes.Buffer
	kustomize := exec.Command("kubectl", "kustomize", filepath.Join(dir, "k8s"))
	kustomize.Stdout, kustomize.Stderr = &rendered, &stderr
	file := filepath.Join(dir, "rendered.yaml")
	err := kustomize.Run()
	if err == nil {
		err = os.WriteFile(file, rendered.Bytes(), 0o644)
	}
	if err != nil {
		t.Fatalf("kubectl kustomize: %v\n%s", err, &stderr)
	}
	args := []string{"static", "-repo", dir, "-rendered", file, "-out", t.TempDir(), "-binary", filepath.Join(dir, "bin")}
	if code := run(args, &out, &stderr); code > 1 || stderr.Len() > 0 {
		t.Fatalf("exit code %d: %s\n%s", code, &stderr, &out)
	}
	return out.String()
}

func TestStaticPasses(t *testing.T) {
	if out := runStatic(t, copyRepo(t)); strings.Contains(out, "FAIL") {
		t.Fatalf("failures on the repository as it is:\n%s", out)
	}
}

// TestStaticCatches breaks one thing at a time and expects its check to fail.
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
						t.Fatalf("%s does not contain %q (%v): the case no longer breaks anything", e.file, e.old, err)
					}
					data = bytes.Replace(old, []byte(e.old), data, 1)
				}
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if out := runStatic(t, dir); !strings.Contains(out, "  FAIL "+tt.want) {
				t.Errorf("after %q: no FAIL line starting %q; output:\n%s", tt.edits, tt.want, out)
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
		broken := false
		for _, b := range breaks {
			broken = broken || strings.HasPrefix(what, b.want)
		}
		if !broken {
			t.Errorf("no case in breaks breaks %q", what)
		}
	}
}

// TestBinaryCatches builds small programs the way the Dockerfile does, and
// not, and checks the binary checks tell them apart.
func TestBinaryCatches(t *testing.T) {
	dir := t.TempDir()
	for name, text := range map[string]string{"go.mod": "module stub\n\ngo 1.26\n", "empty.crt": "",
		"main.go": "package main\n\nvar version = \"dev\"\n\nfunc main() { println(version) }\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	build := func(name string, args ...string) string {
		cmd := exec.Command("go", append([]string{"build", "-o", name}, args...)...)
		cmd.Dir, cmd.Env = dir, append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", name, err, out)
		}
		return filepath.Join(dir, name)
	}
	// The stub needs no more than the runtime, so the builds stay quick; a
	// dynamically linked system program stands for a cgo build.
	good := build("good", "-trimpath", "-ldflags", "-s -w -X main.version=test")
	dynamic, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	ca := "/etc/ssl/certs/ca-certificates.crt"
	for _, tt := range []struct {
		name, file, ca, arch string
		want                 []string // the FAIL lines, none for a pass
	}{
		{"as the Dockerfile builds", good, ca, "amd64", nil},
		{"not stripped", build("symbols", "-trimpath"), ca, "amd64", []string{"stripped"}},
		{"no -trimpath", build("paths", "-ldflags", "-s -w"), ca, "amd64", []string{"build settings"}},
		{"dynamically linked", dynamic, ca, "amd64", []string{"ELF executable", "statically linked", "build settings"}},
		{"other architecture", good, ca, "arm64", []string{"ELF executable for the target platform", "build settings"}},
		{"empty CA bundle", good, filepath.Join(dir, "empty.crt"), "amd64", []string{"the CA bundle"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			run([]string{"binary", "-file", tt.file, "-ca", tt.ca, "-goarch", tt.arch}, &out, &out)
			if n := strings.Count(out.String(), "  FAIL "); n != len(tt.want) {
				t.Errorf("%d failures, want %d", n, len(tt.want))
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), "  FAIL "+w) {
					t.Errorf("no FAIL line starting %q", w)
				}
			}
			if t.Failed() {
				t.Logf("output:\n%s", &out)
			}
		})
	}
}
