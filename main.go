// oauth-proxy forwards HTTP requests to the Anthropic API unchanged, except
// for a configured set of injected headers — by default
// "anthropic-beta: oauth-2025-04-20", which Claude Max OAuth bearer tokens
// need — and streams every response back as it arrives.
//
// Usage:
//
//	oauth-proxy [-config PATH] [-check] [-version]
//
// The config path is -config, else $CONFIG_PATH, else
// anthropic-oauth-proxy.toml in the working directory. -check validates the
// config and exits. $LOG_LEVEL is debug, info (default), warn or error;
// logs are JSON lines on stderr. GET /health and GET /metrics are answered
// locally; every other request goes to the upstream. SIGTERM or SIGINT stops
// accepting connections, lets in-flight requests finish for up to 5 s, and
// exits 0.
//
// Run it on a laptop with:
//
//	go build && ./oauth-proxy -config local.toml
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// run is the whole program; it returns the exit code. Cancelling ctx acts
// like a shutdown signal.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	return runWith(ctx, args, getenv, stdout, stderr, defaultTuning)
}

func runWith(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer, tun tuning) int {
	fs := flag.NewFlagSet("oauth-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configFlag := fs.String("config", "", "config file `path` (default $CONFIG_PATH, else anthropic-oauth-proxy.toml)")
	check := fs.Bool("check", false, "validate the config, print the result and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 1
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "oauth-proxy: unexpected argument %q (the config file is given with -config)\n", fs.Arg(0))
		return 1
	}
	if *showVersion {
		fmt.Fprintln(stdout, "oauth-proxy", version)
		return 0
	}
	path := configPath(*configFlag, getenv)

	// -check: validate, say so in one line, bind nothing (like nginx -t).
	if *check {
		if _, err := loadConfig(path); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: configuration is valid\n", path)
		return 0
	}

	level, err := parseLevel(getenv("LOG_LEVEL"))
	if err != nil {
		fmt.Fprintln(stderr, "oauth-proxy:", err)
		return 1
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	cfg, err := loadConfig(path)
	if err != nil {
		log.Error("invalid config: "+err.Error(), "config", path)
		return 1
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	p := &process{cfg: cfg, path: path, log: log, tun: tun, sigs: sigs}
	return p.run(ctx)
}

// process is the proxy's life from a loaded config to its exit: the loop
// that turns what happens to it into Events, walks service.go's machine
// with them, and carries out its Actions.
type process struct {
	cfg  *Config
	path string
	log  *slog.Logger
	tun  tuning
	sigs <-chan os.Signal

	s        *server
	srv      *http.Server
	events   chan Event // events the process raises itself
	serveErr chan error // the listener's failure
	exitCode int
	state    State
}

// run walks the machine from Initializing to Stopped and returns the exit
// code. Entering Draining starts the drain; its end is an Event.
func (p *process) run(ctx context.Context) int {
	p.events = make(chan Event, 2)
	p.serveErr = make(chan error, 1)
	p.events <- ConfigLoaded
	p.state = Initializing
	for {
		var e Event
		select {
		case e = <-p.events:
			// The process's own events first: ListenerReady, raised
			// before a signal that is also waiting, must not lose a
			// random draw to it, or the signal would stop the process
			// without a drain.
		default:
			e = p.wait(ctx)
		}
		if e == ShutdownSignal && ctx.Err() != nil {
			ctx = context.Background() // cancelling ctx acts once
		}
		next, action := handleEvent(p.state, e)
		p.log.Debug("state", "from", p.state.String(), "event", e.String(), "to", next.String(), "action", action.String())
		prev := p.state
		p.state = next
		switch {
		case action == StartListener:
			if !p.start() {
				return 1
			}
			p.events <- ListenerReady
		case action == Shutdown:
			p.stop(e)
			return p.exitCode
		case p.state == Draining && prev != Draining:
			p.drain()
		}
	}
}

// wait returns the next event: a signal, ctx cancelled, the listener's
// failure, or one the process raised itself.
func (p *process) wait(ctx context.Context) Event {
	select {
	case e := <-p.events:
		return e
	case sig := <-p.sigs:
		p.log.Info("shutdown signal", "signal", sig.String(), "state", p.state.String())
	case <-ctx.Done():
		p.log.Info("shutdown requested", "state", p.state.String())
	case err := <-p.serveErr:
		p.log.Error("listener failed: "+err.Error(), "listen_addr", p.cfg.ListenAddr)
		p.exitCode = 1
	}
	return ShutdownSignal
}

// start binds the listen address and serves on it.
func (p *process) start() bool {
	p.s = newServer(p.cfg, p.log, p.tun)
	p.srv = p.s.httpServer()
	ln, err := net.Listen("tcp", p.cfg.ListenAddr)
	if err != nil {
		p.log.Error("cannot listen: "+err.Error(), "config", p.path, "listen_addr", p.cfg.ListenAddr)
		return false
	}
	go func() {
		// Serve returns ErrServerClosed as soon as the drain begins.
		if err := p.srv.Serve(p.s.listen(ln)); !errors.Is(err, http.ErrServerClosed) {
			p.serveErr <- err
		}
	}()
	p.log.Info("listening",
		"version", version,
		"config", p.path,
		"listen_addr", ln.Addr().String(),
		"upstream", p.cfg.Upstream.String(),
		"injected_headers", len(p.cfg.Headers))
	return true
}

// drain stops accepting connections and lets the requests in flight finish
// for the drain timeout; its outcome is the event Drained or DrainTimeout.
// Its context is a fresh one: the signal must not cancel the requests it
// lets finish.
func (p *process) drain() {
	p.log.Info("draining", "drain_timeout", p.tun.drainTimeout.String())
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), p.tun.drainTimeout)
		defer cancel()
		if err := p.srv.Shutdown(ctx); err != nil {
			p.events <- DrainTimeout
		} else {
			p.events <- Drained
		}
	}()
}

// stop closes whatever is still open after the event e ended the process.
func (p *process) stop(e Event) {
	if p.srv == nil {
		return // stopped before the listener started
	}
	if e != Drained {
		p.log.Warn("closing connections still open", "event", e.String())
	}
	p.s.cutStreams(p.srv, time.Second) // whatever is still streaming
	p.s.transport.CloseIdleConnections()
	p.log.Info("stopped", "event", e.String())
}

// configPath applies SPEC.md's precedence: -config, then $CONFIG_PATH, then
// anthropic-oauth-proxy.toml in the working directory.
func configPath(flagValue string, getenv func(string) string) string {
	if flagValue != "" {
		return flagValue
	}
	if env := getenv("CONFIG_PATH"); env != "" {
		return env
	}
	return "anthropic-oauth-proxy.toml"
}

// parseLevel reads $LOG_LEVEL; empty means info.
func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("LOG_LEVEL %q is not one of debug, info, warn, error", s)
}
