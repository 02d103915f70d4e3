// Command monitoringcheck checks oauth-proxy's monitoring files and writes
// what promtool needs to check them further. .ci/monitoring runs it:
//
//	monitoringcheck -repo DIR -rendered FILE -rules FILE -dashboard-rules FILE
//
// It checks the output of kubectl kustomize k8s/monitoring (-rendered), the
// alerts, their tests in k8s/monitoring/tests and dashboard.json; it writes
// the PrometheusRule's spec to -rules, for promtool check rules and test
// rules, and the dashboard's queries as recording rules to -dashboard-rules.
// Each check prints one line, "ok" or "FAIL"; the exit code is 1 if any failed.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
)

func main() {
	repo := flag.String("repo", ".", "repository root")
	rendered := flag.String("rendered", "", "output of kubectl kustomize k8s/monitoring")
	rules := flag.String("rules", "", "the PrometheusRule's rules file to write")
	dashboardRules := flag.String("dashboard-rules", "", "the dashboard queries' rules file to write")
	flag.Parse()
	if *rendered == "" || *rules == "" || *dashboardRules == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	r := &report{w: os.Stdout}
	if err := check(r, *repo, *rendered, *rules, *dashboardRules); err != nil {
		fmt.Fprintf(os.Stderr, "monitoringcheck: %v\n", err)
		os.Exit(1)
	}
	if r.failures > 0 {
		fmt.Printf("%d check(s) failed\n", r.failures)
		os.Exit(1)
	}
}

// report prints one line per check and counts the failures.
type report struct {
	w        io.Writer
	failures int
}

func (r *report) check(what string, f func() (string, error)) {
	switch detail, err := f(); {
	case err != nil:
		r.failures++
		fmt.Fprintf(r.w, "  FAIL %s: %v\n", what, err)
	case detail != "":
		fmt.Fprintf(r.w, "  ok   %s: %s\n", what, detail)
	default:
		fmt.Fprintf(r.w, "  ok   %s\n", what)
	}
}

// check runs every check; it returns an error only for files it cannot read.
func check(r *report, repo, rendered, rulesOut, dashboardOut string) error {
	in, err := load(repo, rendered, rulesOut, dashboardOut)
	if err != nil {
		return err
	}
	r.check("kubectl kustomize k8s/monitoring renders one PrometheusRule and one ConfigMap, "+
		"in the base's namespace", in.checkObjects)
	r.check("they decode strictly as the Prometheus Operator's PrometheusRule and a ConfigMap: no unknown field",
		func() (string, error) { return "", problems(in.strict) })
	r.check("the dashboard ConfigMap is labelled for the Grafana sidecar and holds dashboard.json unchanged",
		in.checkConfigMap)
	r.check("the PrometheusRule's spec is written as a plain rules file for promtool, as the operator writes it",
		in.writeRules)
	r.check("every alert is named once and has a severity label and summary, description and runbook annotations",
		in.checkAlerts)
	r.check("every alert selects the proxy's job and the base's namespace, as the dashboard's variables do",
		in.checkSelectors)
	r.check("k8s/monitoring/tests: every alert has a test case where it fires and one where it does not",
		in.checkTests)
	r.check("dashboard.json has a uid, a title and a ${datasource} variable of Prometheus data sources",
		in.checkDashboard)
	r.check("every panel, query and query variable uses the ${datasource} variable", func() (string, error) {
		return fmt.Sprintf("%d queries", len(in.queries)), problems(in.notDatasource)
	})
	r.check("every query's variables are defined; they are replaced by their current values, built-ins by 5m",
		func() (string, error) { return in.varsText, problems(in.unknownVariables) })
	r.check("the queries are written as recording rules for promtool check rules", in.writeDashboardRules)
	r.check("the alerts and the dashboard's queries parse as PromQL and name only metrics of "+
		"testdata/metrics.golden, SPEC's plan usage metrics and up", in.checkMetricNames)
	return nil
}
