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

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	state := Initializing
	step := func(e Event) Action {
		next, action := handleEvent(state, e)
		log.Debug("state", "from", state.String(), "event", e.String(), "to", next.String(), "action", action.String())
		state = next
		return action
	}

	cfg, err := loadConfig(path)
	if err != nil {
		log.Error("invalid config: "+err.Error(), "config", path)
		return 1
	}
	if step(ConfigLoaded) != StartListener {
		return 1
	}
	s := newServer(cfg, log, tun)
	srv := s.httpServer()
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		log.Error("cannot listen: "+err.Error(), "config", path, "listen_addr", cfg.ListenAddr)
		return 1
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(s.listen(ln)) }()
	step(ListenerReady)
	log.Info("listening",
		"version", version,
		"config", path,
		"listen_addr", ln.Addr().String(),
		"upstream", cfg.Upstream.String(),
		"injected_headers", len(cfg.Headers))

	// Running: until a signal, a cancelled ctx, or a failed listener.
	select {
	case sig := <-sigs:
		log.Info("shutdown signal, draining", "signal", sig.String(), "drain_timeout", tun.drainTimeout.String())
	case <-ctx.Done():
		log.Info("shutdown requested, draining", "drain_timeout", tun.drainTimeout.String())
	case err := <-serveErr:
		log.Error("listener failed: "+err.Error(), "listen_addr", cfg.ListenAddr)
		return 1
	}
	step(ShutdownSignal)

	// Draining: Shutdown closes the listener at once and waits for the
	// in-flight requests. Its context is a fresh one: the signal must not
	// cancel the requests it lets finish.
	drainCtx, cancel := context.WithTimeout(context.Background(), tun.drainTimeout)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- srv.Shutdown(drainCtx) }()
	var event Event
	select {
	case err := <-drained:
		event = Drained
		if err != nil {
			event = DrainTimeout
		}
	case sig := <-sigs:
		log.Info("second shutdown signal, stopping now", "signal", sig.String())
		event = ShutdownSignal
	}
	if step(event) == Shutdown {
		if event != Drained {
			log.Warn("closing connections still open", "event", event.String())
		}
		s.cutStreams(srv, time.Second) // whatever is still streaming
		s.transport.CloseIdleConnections()
		log.Info("stopped", "event", event.String())
	}
	return 0
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
