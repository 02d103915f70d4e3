package main

import (
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
