package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestMain turns the test binary into the proxy when runMainEnv is set, so
// that tests can send it real signals (os/signal's own tests do the same).
func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		tun := defaultTuning
		if d, err := time.ParseDuration(os.Getenv(drainEnv)); err == nil {
			tun.drainTimeout = d
		}
		args := strings.Fields(os.Getenv(argsEnv))
		os.Exit(runWith(context.Background(), args, os.Getenv, os.Stdout, os.Stderr, tun))
	}
	os.Exit(m.Run())
}

const (
	runMainEnv = "OAUTH_PROXY_TEST_RUN_MAIN"
	argsEnv    = "OAUTH_PROXY_TEST_ARGS"
	drainEnv   = "OAUTH_PROXY_TEST_DRAIN"
)

// writeConfig writes a config file in a temporary directory.
func writeConfig(t testing.TB, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "proxy.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func validConfig(upstream string) string {
	return `[proxy]
listen_addr = "127.0.0.1:0"
upstream_url = "` + upstream + `"
timeout_secs = 5

[[headers]]
name = "anthropic-beta"
value = "oauth-2025-04-20"
mode = "append"
`
}

func noEnv(string) string { return "" }

func TestRunVersion(t *testing.T) {
	var stdout, stderr strings.Builder
	if code := run(t.Context(), []string{"-version"}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d; stderr %q", code, stderr.String())
	}
	if stdout.String() != "oauth-proxy dev\n" {
		t.Errorf("stdout = %q; want %q", stdout.String(), "oauth-proxy dev\n")
	}
}

func TestRunCheckBindsNothing(t *testing.T) {
	// The config names an address that is already taken: -check must not
	// try to bind it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	path := writeConfig(t, strings.Replace(validConfig("https://api.anthropic.com"), "127.0.0.1:0", ln.Addr().String(), 1))
	for _, args := range [][]string{{"-check", "-config", path}, {"--check", "--config", path}, {"-config=" + path, "-check"}} {
		var stdout, stderr strings.Builder
		if code := run(t.Context(), args, noEnv, &stdout, &stderr); code != 0 {
			t.Fatalf("%v: exit %d; stderr %q", args, code, stderr.String())
		}
		if want := path + ": configuration is valid\n"; stdout.String() != want || stderr.Len() != 0 {
			t.Errorf("%v: stdout %q, stderr %q; want %q and nothing", args, stdout.String(), stderr.String(), want)
		}
	}
}

func TestShippedConfigsPassCheck(t *testing.T) {
	for _, path := range []string{"local.toml", "anthropic-oauth-proxy.example.toml"} {
		var stdout, stderr strings.Builder
		if code := run(t.Context(), []string{"-check", "-config", path}, noEnv, &stdout, &stderr); code != 0 {
			t.Errorf("%s: exit %d: %s", path, code, stderr.String())
		}
	}
}

func TestConfigPathPrecedence(t *testing.T) {
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "CONFIG_PATH" {
				return v
			}
			return ""
		}
	}
	tests := []struct {
		name, flag, env, want string
	}{
		{"flag wins", "a.toml", "b.toml", "a.toml"},
		{"env next", "", "b.toml", "b.toml"},
		{"default last", "", "", "anthropic-oauth-proxy.toml"},
	}
	for _, tt := range tests {
		if got := configPath(tt.flag, env(tt.env)); got != tt.want {
			t.Errorf("%s: configPath(%q, CONFIG_PATH=%q) = %q; want %q", tt.name, tt.flag, tt.env, got, tt.want)
		}
	}
	// And through run: CONFIG_PATH is read, and the default is looked up in
	// the working directory.
	good := writeConfig(t, validConfig("https://api.anthropic.com"))
	var stdout, stderr strings.Builder
	if code := run(t.Context(), []string{"-check"}, env(good), &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), good+":") {
		t.Errorf("CONFIG_PATH: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
	t.Chdir(t.TempDir())
	stdout.Reset()
	stderr.Reset()
	if code := run(t.Context(), []string{"-check"}, noEnv, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "anthropic-oauth-proxy.toml") {
		t.Errorf("default path: exit %d, stderr %q; want 1 naming anthropic-oauth-proxy.toml", code, stderr.String())
	}
}

// TestBadInputExitsOneWithOneLine runs the proxy (not -check) on every kind
// of bad input: exit 1, exactly one JSON line on stderr that names the file
// and line or the address, never a panic.
func TestBadInputExitsOneWithOneLine(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	base := validConfig("https://api.anthropic.com")
	tests := []struct {
		name   string
		config string // "" = no file at all
		env    map[string]string
		want   string // in the error line
	}{
		{"missing file", "", nil, "no such file"},
		{"bad listen_addr", strings.Replace(base, `"127.0.0.1:0"`, `"localhost"`, 1), nil, ":2: "},
		{"port in use", strings.Replace(base, "127.0.0.1:0", taken.Addr().String(), 1), nil, taken.Addr().String()},
		{"bad scheme", strings.Replace(base, "https://api.anthropic.com", "ftp://api.anthropic.com", 1), nil, ":3: "},
		{"no host", strings.Replace(base, "https://api.anthropic.com", "https://", 1), nil, ":3: "},
		{"empty upstream port", strings.Replace(base, "https://api.anthropic.com", "https://127.0.0.1:", 1), nil, ":3: proxy.upstream_url port"},
		{"empty listen port", strings.Replace(base, `"127.0.0.1:0"`, `"127.0.0.1:"`, 1), nil, ":2: proxy.listen_addr must be host:port"},
		{"timeout zero", strings.Replace(base, "timeout_secs = 5", "timeout_secs = 0", 1), nil, ":4: "},
		{"timeout string", strings.Replace(base, "timeout_secs = 5", `timeout_secs = "5"`, 1), nil, ":4: "},
		{"max_connections zero", base + "", nil, ""},
		{"max_body too big", strings.Replace(base, "timeout_secs = 5", "max_body_bytes = 67108865", 1), nil, ":4: "},
		{"header name", strings.Replace(base, `name = "anthropic-beta"`, `name = "anthropic beta"`, 1), nil, ":7: "},
		{"empty value", strings.Replace(base, `value = "oauth-2025-04-20"`, `value = ""`, 1), nil, ":"},
		{"CRLF in value", strings.Replace(base, `value = "oauth-2025-04-20"`, `value = "a\r\nX-Evil: 1"`, 1), nil, ":"},
		{"remove with value", strings.Replace(base, `mode = "append"`, `mode = "remove"`, 1), nil, ":"},
		{"unknown mode", strings.Replace(base, `mode = "append"`, `mode = "prepend"`, 1), nil, ":9: "},
		{"authorization", strings.Replace(base, `name = "anthropic-beta"`, `name = "Authorization"`, 1), nil, ":"},
		{"hop-by-hop", strings.Replace(base, `name = "anthropic-beta"`, `name = "Connection"`, 1), nil, ":"},
		{"duplicate header", base + "\n[[headers]]\nname = \"Anthropic-Beta\"\nvalue = \"x\"\n", nil, "6"},
		{"tailscale section", base + "\n[tailscale]\nhostname = \"x\"\n", nil, ":11: "},
		{"unknown key", strings.Replace(base, "timeout_secs = 5", "timeout = 5", 1), nil, ":4: "},
		{"duplicate key", strings.Replace(base, "timeout_secs = 5", "timeout_secs = 5\ntimeout_secs = 6", 1), nil, ":5: "},
		{"unterminated string", strings.Replace(base, `"https://api.anthropic.com"`, `"https://api.anthropic.com`, 1), nil, ":3: "},
		{"trailing garbage", strings.Replace(base, "timeout_secs = 5", "timeout_secs = 5 5", 1), nil, ":4: "},
		{"NUL byte", base + "\x00", nil, ":"},
		{"UTF-16", "\xff\xfe[\x00p\x00", nil, "UTF-16"},
		{"bad LOG_LEVEL", base, map[string]string{"LOG_LEVEL": "loud"}, "LOG_LEVEL"},
	}
	tests[9].config = strings.Replace(base, "timeout_secs = 5", "max_connections = 0", 1)
	tests[9].want = ":4: "
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "missing.toml")
			if tt.config != "" {
				path = writeConfig(t, tt.config)
			}
			getenv := func(k string) string { return tt.env[k] }
			var stdout, stderr strings.Builder
			code := run(t.Context(), []string{"-config", path}, getenv, &stdout, &stderr)
			lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
			if code != 1 || len(lines) != 1 {
				t.Fatalf("exit %d with %d stderr lines %q; want 1 and one line", code, len(lines), stderr.String())
			}
			line := lines[0]
			if tt.name != "bad LOG_LEVEL" {
				var m map[string]any
				if err := json.Unmarshal([]byte(line), &m); err != nil || m["level"] != "ERROR" {
					t.Errorf("stderr line is not a JSON error: %q", line)
				}
				if !strings.Contains(line, filepath.Base(path)) {
					t.Errorf("stderr line %q does not name the file", line)
				}
			}
			if !strings.Contains(line, tt.want) || strings.Contains(line, "goroutine") || strings.Contains(line, "panic") {
				t.Errorf("stderr line %q; want it to contain %q and no panic", line, tt.want)
			}

			// -check says the same on one plain line.
			stdout.Reset()
			stderr.Reset()
			if tt.name == "bad LOG_LEVEL" || tt.name == "port in use" {
				return
			}
			code = run(t.Context(), []string{"-check", "-config", path}, getenv, &stdout, &stderr)
			if code != 1 || strings.Count(stderr.String(), "\n") != 1 || stdout.Len() != 0 {
				t.Errorf("-check: exit %d, stdout %q, stderr %q; want 1 and one line", code, stdout.String(), stderr.String())
			}
		})
	}
}

func TestRunRejectsStrayArguments(t *testing.T) {
	var stdout, stderr strings.Builder
	if code := run(t.Context(), []string{"local.toml"}, noEnv, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "-config") {
		t.Errorf("exit %d, stderr %q; want 1 and a hint about -config", code, stderr.String())
	}
	stderr.Reset()
	if code := run(t.Context(), []string{"-bogus"}, noEnv, &stdout, &stderr); code != 1 {
		t.Errorf("unknown flag: exit %d; want 1", code)
	}
}

// startRun runs the proxy in-process and returns its address once it
// listens, with its stderr and a channel that receives the exit code.
func startRun(t *testing.T, ctx context.Context, config string, getenv func(string) string, tun tuning) (addr string, logs *logBuffer, exit chan int) {
	t.Helper()
	logs = newLogBuffer()
	exit = make(chan int, 1)
	path := writeConfig(t, config)
	go func() { exit <- runWith(ctx, []string{"-config", path}, getenv, io.Discard, logs, tun) }()
	deadline := time.After(5 * time.Second)
	for {
		for _, l := range logs.lines(t) {
			if l["msg"] == "listening" {
				return l["listen_addr"].(string), logs, exit
			}
		}
		select {
		case <-logs.written:
		case code := <-exit:
			t.Fatalf("proxy exited %d before listening:\n%s", code, logs.String())
		case <-deadline:
			t.Fatalf("proxy did not start:\n%s", logs.String())
		}
	}
}

func TestRunDrainsInFlightRequests(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		io.WriteString(w, "finished")
	}))
	defer up.Close()
	ctx, stop := context.WithCancel(t.Context())
	addr, logs, exit := startRun(t, ctx, validConfig(up.URL), noEnv, testTuning)

	result := make(chan string, 1)
	go func() {
		res, err := http.Post("http://"+addr+"/v1/messages", "application/json", strings.NewReader("{}"))
		if err != nil {
			result <- err.Error()
			return
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		result <- string(b)
	}()
	<-entered
	stop() // like SIGTERM
	waitLog(t, logs, "draining")
	// The line is logged just before Shutdown closes the listener.
	if !eventuallyRefused(addr) {
		t.Error("new connections were still accepted while draining")
	}
	close(release)
	if got := <-result; got != "finished" {
		t.Errorf("in-flight request got %q; want it to finish", got)
	}
	if code := <-exit; code != 0 {
		t.Errorf("exit %d; want 0", code)
	}
	if !strings.Contains(logs.String(), `"event":"Drained"`) {
		t.Errorf("log does not say Drained:\n%s", logs.String())
	}
}

// TestSignalAtStartupStillDrains: a signal already waiting when the
// listener comes up is taken after ListenerReady, never instead of it, so
// the process drains (Running → Draining) rather than stopping from
// Starting. Before the process's own events came first, each run was a
// coin toss.
func TestSignalAtStartupStillDrains(t *testing.T) {
	cfg, err := parseConfig("proxy.toml", []byte(validConfig("http://127.0.0.1:9")))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		sigs := make(chan os.Signal, 1)
		sigs <- syscall.SIGTERM
		logs := newLogBuffer()
		log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		p := &process{cfg: cfg, path: "proxy.toml", log: log, tun: testTuning, sigs: sigs}
		if code := p.run(t.Context()); code != 0 {
			t.Fatalf("run %d: exit %d; want 0", i, code)
		}
		var path []string
		for _, l := range logs.lines(t) {
			if l["msg"] == "state" {
				path = append(path, l["to"].(string))
			}
		}
		if want := []string{"Starting", "Running", "Draining", "Stopped"}; !slices.Equal(path, want) {
			t.Fatalf("run %d: states %v; want %v", i, path, want)
		}
	}
}

// TestRunWalksTheStateMachine checks, through the debug log, that run
// really drives service.go from startup to Stopped, and that the startup
// line says what an operator needs.
func TestRunWalksTheStateMachine(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer up.Close()
	ctx, stop := context.WithCancel(t.Context())
	debug := func(k string) string {
		if k == "LOG_LEVEL" {
			return "debug"
		}
		return ""
	}
	addr, logs, exit := startRun(t, ctx, validConfig(up.URL), debug, testTuning)
	stop()
	if code := <-exit; code != 0 {
		t.Fatalf("exit %d; want 0", code)
	}
	type step struct{ From, Event, To, Action string }
	var got []step
	var listening map[string]any
	for _, l := range logs.lines(t) {
		switch l["msg"] {
		case "state":
			got = append(got, step{l["from"].(string), l["event"].(string), l["to"].(string), l["action"].(string)})
		case "listening":
			listening = l
		}
	}
	want := []step{
		{"Initializing", "ConfigLoaded", "Starting", "StartListener"},
		{"Starting", "ListenerReady", "Running", "None"},
		{"Running", "ShutdownSignal", "Draining", "None"},
		{"Draining", "Drained", "Stopped", "Shutdown(0)"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("state transitions (-want +got):\n%s", diff)
	}
	if listening["listen_addr"] != addr || listening["upstream"] != up.URL ||
		listening["injected_headers"] != float64(1) || !strings.HasSuffix(listening["config"].(string), "proxy.toml") {
		t.Errorf("startup line = %v; want config path, listen address, upstream and 1 injected header", listening)
	}
}

// eventuallyRefused reports whether connections to addr are refused
// (ECONNREFUSED) within a few seconds. A connection still in the accept
// queue when the listener closes is reset, so it polls.
func eventuallyRefused(addr string) bool {
	return eventually(10*time.Millisecond, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return errors.Is(err, syscall.ECONNREFUSED)
	})
}

// waitLog waits until a log line with msg appears.
func waitLog(t testing.TB, logs *logBuffer, msg string) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		for _, l := range logs.lines(t) {
			if l["msg"] == msg {
				return
			}
		}
		select {
		case <-logs.written:
		case <-deadline:
			t.Fatalf("no %q log line:\n%s", msg, logs.String())
		}
	}
}

// proxyProcess is the test binary re-executed as the proxy.
type proxyProcess struct {
	cmd    *exec.Cmd
	addr   string
	stderr *logBuffer
	exit   chan error
}

func startProcess(t *testing.T, config string, drain time.Duration) *proxyProcess {
	t.Helper()
	path := writeConfig(t, config)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), runMainEnv+"=1", argsEnv+"=-config "+path, drainEnv+"="+drain.String())
	p := &proxyProcess{cmd: cmd, stderr: newLogBuffer(), exit: make(chan error, 1)}
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			p.stderr.Write(append(sc.Bytes(), '\n'))
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "listening" {
				lines <- m["listen_addr"].(string)
			}
		}
		p.exit <- cmd.Wait()
	}()
	select {
	case p.addr = <-lines:
	case err := <-p.exit:
		t.Fatalf("proxy exited before listening: %v\n%s", err, p.stderr.String())
	case <-time.After(10 * time.Second):
		t.Fatalf("proxy did not start:\n%s", p.stderr.String())
	}
	return p
}

// wait returns the exit code, failing if it takes longer than limit.
func (p *proxyProcess) wait(t testing.TB, limit time.Duration) int {
	t.Helper()
	select {
	case err := <-p.exit:
		if err == nil {
			return 0
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatal(err)
	case <-time.After(limit):
		t.Fatalf("proxy still running after %v:\n%s", limit, p.stderr.String())
	}
	return -1
}

func TestSIGTERMLetsInFlightRequestsFinish(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
		io.WriteString(w, "finished")
	}))
	defer up.Close()
	p := startProcess(t, validConfig(up.URL), 5*time.Second)
	result := make(chan string, 1)
	go func() {
		res, err := http.Get("http://" + p.addr + "/v1/models")
		if err != nil {
			result <- err.Error()
			return
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		result <- string(b)
	}()
	<-entered
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitLog(t, p.stderr, "draining")
	close(release)
	if got := <-result; got != "finished" {
		t.Errorf("in-flight request got %q; want it to finish", got)
	}
	if code := p.wait(t, 5*time.Second); code != 0 {
		t.Errorf("exit %d after SIGTERM; want 0\n%s", code, p.stderr.String())
	}
	p.stderr.checkJSON(t)
}

func TestSIGTERMWithFiftyInFlightDrainsAll(t *testing.T) {
	// 50 requests are held by the upstream when SIGTERM arrives; they are
	// released once the proxy refuses new connections, and all finish
	// inside the 5 s drain.
	const n = 50
	var entered atomic.Int64
	all := make(chan struct{})
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if entered.Add(1) == n {
			close(all)
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "finished "+r.URL.Path)
	}))
	t.Cleanup(up.Close)
	t.Cleanup(releaseOnce) // before up.Close, which waits for its handlers
	p := startProcess(t, validConfig(up.URL), 5*time.Second)
	c := testClient(t)
	results := make(chan string, n) // "" for a request that finished as it should
	for i := range n {
		go func() {
			path := "/v1/messages/" + strconv.Itoa(i)
			res, err := c.Post("http://"+p.addr+path, "application/json", strings.NewReader("{}"))
			if err != nil {
				results <- err.Error()
				return
			}
			b, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != 200 || string(b) != "finished "+path {
				results <- path + ": " + strconv.Itoa(res.StatusCode) + " " + string(b)
				return
			}
			results <- ""
		}()
	}
	select {
	case <-all:
	case <-time.After(10 * time.Second):
		t.Fatalf("only %d of %d requests reached the upstream", entered.Load(), n)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitLog(t, p.stderr, "draining")
	if !eventuallyRefused(p.addr) {
		t.Error("new connections were still accepted while draining; want connection refused")
	}
	releaseOnce()
	finished := 0
	deadline := time.After(10 * time.Second)
	for range n {
		select {
		case r := <-results:
			if r != "" {
				t.Errorf("in-flight request: %s", r)
			} else {
				finished++
			}
		case <-deadline:
			t.Fatalf("%d of %d in-flight requests answered within 10 s", finished, n)
		}
	}
	code := p.wait(t, 5*time.Second)
	if code != 0 || finished != n {
		t.Errorf("%d of %d in-flight requests finished, exit %d; want all and exit 0", finished, n, code)
	}
	if !strings.Contains(p.stderr.String(), `"event":"Drained"`) {
		t.Errorf("log does not say Drained:\n%s", p.stderr.String())
	}
	t.Logf("SIGTERM with %d requests in flight: %d finished, exit %d", n, finished, code)
}

// neverEndingStream is an upstream whose responses never finish.
func neverEndingStream(t testing.TB) (*httptest.Server, chan struct{}) {
	entered := make(chan struct{}, 16)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: ping\n\n")
		w.(http.Flusher).Flush()
		entered <- struct{}{}
		<-r.Context().Done()
	}))
	t.Cleanup(up.Close)
	return up, entered
}

func TestSIGTERMDrainTimeoutCutsStreams(t *testing.T) {
	up, entered := neverEndingStream(t)
	p := startProcess(t, validConfig(up.URL), 300*time.Millisecond)
	res, err := http.Get("http://" + p.addr + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	<-entered
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 5*time.Second); code != 0 {
		t.Errorf("exit %d; want 0", code)
	}
	if _, err := io.ReadAll(res.Body); err == nil {
		t.Error("the stream ended cleanly; want it cut at the drain timeout")
	}
	if !strings.Contains(p.stderr.String(), `"event":"DrainTimeout"`) {
		t.Errorf("log does not say DrainTimeout:\n%s", p.stderr.String())
	}
	// The cut stream still gets its one log line, saying the proxy cut it.
	lines := p.stderr.requests(t)
	if len(lines) != 1 || lines[0]["status"] != float64(200) ||
		lines[0]["error"] != "cut at shutdown: still open when the drain timeout ran out" {
		t.Errorf("request log lines = %v; want one, status 200, cut at shutdown", lines)
	}
}

func TestSecondSignalStopsAtOnce(t *testing.T) {
	up, entered := neverEndingStream(t)
	p := startProcess(t, validConfig(up.URL), time.Minute)
	res, err := http.Get("http://" + p.addr + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	<-entered
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitLog(t, p.stderr, "draining")
	p.cmd.Process.Signal(syscall.SIGINT)
	if code := p.wait(t, 5*time.Second); code != 0 {
		t.Errorf("exit %d; want 0", code)
	}
	if !strings.Contains(p.stderr.String(), `"event":"ShutdownSignal"`) {
		t.Errorf("log does not say ShutdownSignal:\n%s", p.stderr.String())
	}
}
