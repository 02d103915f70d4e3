// Command monitoringcheck verifies oauth-proxy's monitoring files in
// k8s/monitoring and writes what promtool needs to check them further.
// .ci/monitoring runs it.
//
//	monitoringcheck rules -repo DIR -rendered FILE -out FILE
//
// checks the output of kubectl kustomize k8s/monitoring (a PrometheusRule
// and the dashboard's ConfigMap, in the base's namespace), the alerts'
// labels and annotations, and that k8s/monitoring/tests holds a firing and
// a silent test case for every alert; writes the PrometheusRule's spec to
// -out as a plain rules file for promtool check rules and test rules.
//
//	monitoringcheck dashboard -repo DIR -out FILE
//
// checks k8s/monitoring/dashboard.json: its ${datasource} variable, that
// every panel and query uses it, and that its queries (and its variables'
// label_values queries) name only metrics the proxy exports; writes each
// query, with the variables replaced by their current values, as a
// recording rule to -out, for promtool check rules to parse.
//
// Each invariant prints one line, "ok" or "FAIL"; the exit code is 1 if any failed.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// report prints one line per check and counts the failures.
type report struct {
	w        io.Writer
	failures int
}

func (r *report) check(what string, f func() (string, error)) {
	detail, err := f()
	if err != nil {
		r.failures++
		fmt.Fprintf(r.w, "  FAIL %s: %v\n", what, err)
		return
	}
	if detail != "" {
		fmt.Fprintf(r.w, "  ok   %s: %s\n", what, detail)
	} else {
		fmt.Fprintf(r.w, "  ok   %s\n", what)
	}
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: monitoringcheck rules|dashboard [flags]")
		return 2
	}
	fs := flag.NewFlagSet("monitoringcheck "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	repo := fs.String("repo", ".", "repository root")
	out := fs.String("out", "", "the rules file to write")
	r := &report{w: stdout}
	switch args[0] {
	case "rules":
		rendered := fs.String("rendered", "", "output of kubectl kustomize k8s/monitoring")
		if fs.Parse(args[1:]) != nil {
			return 2
		}
		if *rendered == "" || *out == "" {
			fmt.Fprintln(stderr, "monitoringcheck rules: -rendered and -out are required")
			return 2
		}
		if err := checkRules(r, *repo, *rendered, *out); err != nil {
			fmt.Fprintf(stderr, "monitoringcheck rules: %v\n", err)
			return 1
		}
	case "dashboard":
		if fs.Parse(args[1:]) != nil {
			return 2
		}
		if *out == "" {
			fmt.Fprintln(stderr, "monitoringcheck dashboard: -out is required")
			return 2
		}
		if err := checkDashboard(r, *repo, *out); err != nil {
			fmt.Fprintf(stderr, "monitoringcheck dashboard: %v\n", err)
			return 1
		}
	default:
		fmt.Fprintf(stderr, "monitoringcheck: unknown command %q, want rules or dashboard\n", args[0])
		return 2
	}
	if r.failures > 0 {
		fmt.Fprintf(stdout, "%d check(s) failed\n", r.failures)
		return 1
	}
	return 0
}
