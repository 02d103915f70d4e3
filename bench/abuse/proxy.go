package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The proxy under test: built once, then one fresh process per scenario,
// so that each scenario's VmHWM is its own.

// buildProxy builds oauth-proxy from src as the Dockerfile does
// (CGO_ENABLED=0, -trimpath, -s -w), into dir.
func buildProxy(ctx context.Context, src, dir string) (string, error) {
	bin := filepath.Join(dir, "oauth-proxy")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build in %s: %v\n%s", src, err, out)
	}
	return bin, nil
}

// configTemplate is anthropic-oauth-proxy.example.toml, the default
// config, with the listen address and upstream of the harness.
const configTemplate = `[proxy]
listen_addr = %q
upstream_url = "https://%s"
timeout_secs = 60
max_connections = 1000
max_body_bytes = 10485760

[[headers]]
name = "anthropic-beta"
value = "oauth-2025-04-20"
mode = "append"
`

// The default config's limits, which the scenarios are sized against.
const (
	maxConnections = 1000     // max_connections: proxied requests in flight
	maxBodyBytes   = 10 << 20 // max_body_bytes
	budgetBytes    = 64 << 20 // the shared body budget
	reserveBytes   = 16 << 20 // its last quarter, kept for first chunks
)

// proxyProc is one running proxy process.
type proxyProc struct {
	cmd     *exec.Cmd
	addr    string // listen address, 127.0.0.1:port
	logPath string // its stderr: one JSON line per request
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// startProxy starts bin with a fresh config in dir and waits until it
// answers /health. Its environment is the harness's with the pod's
// GOMEMLIMIT and the upstream's certificate; anything that would change
// its memory or logging behaviour is dropped.
func startProxy(ctx context.Context, bin, dir, name, memLimit string, up *upstream) (*proxyProc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, name+".toml")
	if err := os.WriteFile(cfgPath, fmt.Appendf(nil, configTemplate, addr, up.addr), 0o644); err != nil {
		return nil, err
	}
	p := &proxyProc{addr: addr, logPath: filepath.Join(dir, name+".log"), exited: make(chan struct{})}
	logFile, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own descriptor
	var env []string
	for _, kv := range os.Environ() {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "GOMEMLIMIT", "GOGC", "GODEBUG", "LOG_LEVEL", "SSL_CERT_FILE", "SSL_CERT_DIR":
		default:
			env = append(env, kv)
		}
	}
	p.cmd = exec.Command(bin, "-config", cfgPath)
	p.cmd.Env = append(env, "GOMEMLIMIT="+memLimit, "SSL_CERT_FILE="+up.certFile)
	p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
	p.cmd.SysProcAttr = childAttr()
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		status, _, err := get(ctx, probeClient, "http://"+addr+"/health")
		if err == nil && status == http.StatusOK {
			return p, nil
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("proxy exited at startup (%v): %s", p.waitErr, p.logTail())
		case <-ctx.Done():
			p.kill()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.kill()
			return nil, fmt.Errorf("proxy not answering /health on %s after 10s: %s", addr, p.logTail())
		}
	}
}

// freeAddr returns a 127.0.0.1 address with a port free right now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func (p *proxyProc) pid() int { return p.cmd.Process.Pid }

func (p *proxyProc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func (p *proxyProc) kill() {
	p.cmd.Process.Kill()
	<-p.exited
}

// stop sends SIGTERM, as Kubernetes does, and waits for the drain (5 s at
// most, SPEC: Lifecycle) plus a margin before killing. It reports how the
// process ended when that is not the clean exit 0 the SPEC promises.
func (p *proxyProc) stop() string {
	if !p.alive() {
		return ""
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if p.waitErr != nil {
			return "exit after SIGTERM: " + p.waitErr.Error()
		}
		return ""
	case <-time.After(8 * time.Second):
		p.kill()
		return "still running 8s after SIGTERM; killed"
	}
}

// logTail returns the end of the proxy's log: what it said before dying
// (a Go runtime crash prints "fatal error: ..." there).
func (p *proxyProc) logTail() string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	const tail = 2048
	if st, err := f.Stat(); err == nil && st.Size() > tail {
		f.Seek(st.Size()-tail, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return strings.TrimSpace(string(b))
}

// logSummary reads the proxy's log line by line (it may be large) and
// counts the request lines by status, and the lines that are not request
// lines by level. A panic or runtime crash shows up as "other" lines.
func (p *proxyProc) logSummary() string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	statuses := newTally()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		switch {
		case bytes.Contains(line, []byte(`"msg":"request"`)):
			statuses.add("request", jsonField(line, "status"))
		case bytes.HasPrefix(line, []byte("{")):
			statuses.add("other", strings.ToLower(jsonField(line, "level")))
		default:
			statuses.add("other", "non-json")
		}
	}
	return statuses.String()
}

// jsonField returns the raw value of a top-level "key": in a JSON line,
// quotes removed: enough for the proxy's flat log lines.
func jsonField(line []byte, key string) string {
	_, rest, ok := bytes.Cut(line, []byte(`"`+key+`":`))
	if !ok {
		return "?"
	}
	end := bytes.IndexAny(rest, ",}")
	if end < 0 {
		end = len(rest)
	}
	return string(bytes.Trim(rest[:end], `"`))
}

// procStatus returns a "kB" field of /proc/pid/status (VmRSS, VmHWM) in
// bytes.
func procStatus(pid int, field string) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no " + field + " in /proc/" + strconv.Itoa(pid) + "/status")
}
