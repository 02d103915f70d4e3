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

func TestMetricNames(t *testing.T) {
	for expr, want := range map[string][]string{
		`sum by (le) (rate(b_bucket{le=~"0.5|1"}[5m])) / on (job) group_left a`:  {"a", "b_bucket"},
		`max_over_time(x[1h:5m]) - sum(x offset 1h) + topk by (z) (3, w)`:        {"w", "x"},
		`label_replace(q, "dst", "$1", "src", "(.*)") - time() # c_in_a_comment`: {"q"},
	} {
		if got, err := metricNames(expr); err != nil || !slices.Equal(got, want) {
			t.Errorf("metricNames(%q) = %q, %v; want %q", expr, got, err, want)
		}
	}
	for _, expr := range []string{`{__name__=~"proxy_.*"}`, `sum({job="x"})`, `rate(x[5m)`, `1 + time()`} {
		if got, err := metricNames(expr); err == nil {
			t.Errorf("metricNames(%q) = %q, want an error", expr, got)
		}
	}
}

func TestVariables(t *testing.T) {
	vals := map[string]string{"job": "kubernetes-pods", "org": ".*"}
	got, err := substitute(`m{job="$job", o=~"${org}", p=~"[[org]]", q="${job:raw}"}[$__rate_interval]`, vals)
	if want := `m{job="kubernetes-pods", o=~".*", p=~".*", q="kubernetes-pods"}[5m]`; err != nil || got != want {
		t.Errorf("substitute: got %s, %v\nwant %s", got, err, want)
	}
	if _, err := substitute(`m{job="$jbo"}`, vals); err == nil || !strings.Contains(err.Error(), "$jbo") {
		t.Errorf("an unknown variable: err = %v, want one naming $jbo", err)
	}
	for raw, want := range map[string]string{`"a"`: "a", `["a","b"]`: "a|b", `["$__all"]`: ".*",
		`"$__all"`: "o.*"} {
		v := variable{Name: "v"}
		if v.Current.Value = []byte(raw); raw == `"$__all"` {
			v.AllValue = "o.*"
		}
		if got, err := v.value(); err != nil || got != want {
			t.Errorf("current value %s: got %q, %v; want %q", raw, got, err, want)
		}
	}
}

// edit replaces old by new in one file of a copy of the repository.
type edit struct{ file, old, new string }

const (
	promRule = "k8s/monitoring/prometheusrule.yaml"
	dash     = "k8s/monitoring/dashboard.json"
	tests    = "k8s/monitoring/tests/proxy.yaml"
	metrics  = "the alerts and the dashboard's queries"
)

// breaks each break one thing; want is the start of the check that must fail.
var breaks = []struct {
	name string
	edit
	want string
}{
	{"broken alert expression", edit{promRule, ") > 0.05", ") > > 0.05"}, "every alert selects"},
	{"alert in another namespace", edit{promRule, `proxy"} == 0`, `proxy-2"} == 0`}, "every alert selects"},
	{"alert on an unknown metric", edit{promRule, "changes(process_start_time_seconds", "changes(process_start_time"}, metrics},
	{"no runbook", edit{promRule, "      runbook: >-\n", "      runbok: >-\n"}, "every alert is named once"},
	{"misspelt field", edit{promRule, "          for: 2m\n", "          fr: 2m\n"}, "they decode strictly"},
	{"misspelt alert name in a test", edit{tests, "6m\n        alertname: OAuthProxyDown",
		"6m\n        alertname: OAuthProxyDwn"}, "k8s/monitoring/tests"},
	{"broken dashboard expression", edit{dash, `"sum(up{`, `"sum(up{{`}, metrics},
	{"unknown dashboard metric", edit{dash, `"sum(up{`, `"sum(upp{`}, metrics},
	{"unknown variable", edit{dash, `"sum(up{job=\"$job\"`, `"sum(up{job=\"$jbo\"`}, "every query's variables"},
	{"dashboard's $job", edit{dash, `"value": "kubernetes-pods"`, `"value": "prometheus"`}, "every alert selects"},
	{"fixed data source", edit{dash, `"uid": "${datasource}"`, `"uid": "P1809F7CD0C75ACF3"`}, "every panel, query"},
}

// runChecks copies k8s/ to a temporary directory, applies e, renders
// k8s/monitoring and runs the checks.
func runChecks(t *testing.T, e edit) string {
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	testdata, err := filepath.Abs("../../testdata")
	if err == nil {
		err = os.Symlink(testdata, path("testdata"))
	}
	if err == nil {
		err = os.CopyFS(path("k8s"), os.DirFS("../../k8s"))
	}
	if data, _ := os.ReadFile(path(e.file)); err == nil && e.file != "" {
		if !bytes.Contains(data, []byte(e.old)) {
			t.Fatalf("%s does not contain %q: the test no longer breaks anything", e.file, e.old)
		}
		err = os.WriteFile(path(e.file), bytes.Replace(data, []byte(e.old), []byte(e.new), 1), 0o644)
	}
	var rendered []byte
	if err == nil {
		rendered, err = exec.Command("kubectl", "kustomize", path("k8s/monitoring")).Output()
	}
	if err == nil {
		err = os.WriteFile(path("rendered.yaml"), rendered, 0o644)
	}
	var buf bytes.Buffer
	if err == nil {
		err = check(&report{w: &buf}, dir, path("rendered.yaml"), path("rules.yaml"),
			path("dashboard-rules.yaml"))
	}
	if err != nil {
		t.Fatalf("%v\n%s", err, buf.String())
	}
	return buf.String()
}

// TestChecks breaks one thing at a time in a copy of the repository.
func TestChecks(t *testing.T) {
	if base := runChecks(t, edit{}); strings.Contains(base, "FAIL") {
		t.Skipf("k8s/monitoring fails as it is, so no break can be told apart:\n%s", base)
	}
	for _, b := range breaks {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			if out := runChecks(t, b.edit); !strings.Contains(out, "  FAIL "+b.want) {
				t.Errorf("no FAIL line starting %q:\n%s", b.want, out)
			}
		})
	}
}
