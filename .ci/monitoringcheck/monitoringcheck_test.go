package main

import (
	"slices"
	"strings"
	"testing"
)

func TestMetricNames(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`sum by (status) (rate(proxy_requests_total{job="j", status=~"5.."}[5m]))`, []string{"proxy_requests_total"}},
		{`histogram_quantile(0.99, sum by (le) (rate(proxy_request_duration_seconds_bucket{job="x"}[5m])))`, []string{"proxy_request_duration_seconds_bucket"}},
		{`a / on (job) group_left (pod) b > bool 1e-3 and c offset 1h30m unless d @ start()`, []string{"a", "b", "c", "d"}},
		{"max without (instance) (m1) # a comment naming not_a_metric\n- min(m2)", []string{"m1", "m2"}},
		{`sum(x{l="{a}", m='b]'}) + count_values("value", y) + topk by (z) (3, w) + Inf + NaN`, []string{"x", "y", "w"}},
		{`label_replace(q, "dst", "$1", "src", "(.*)") - time() + vector(0.5) + .5`, []string{"q"}},
		{`max_over_time(x[1h:5m]) - sum(x)`, []string{"x"}},
		{`avg (m:rule:rate5m)`, []string{"m:rule:rate5m"}},
	} {
		got, err := metricNames(tc.expr)
		if err != nil {
			t.Errorf("metricNames(%q): %v", tc.expr, err)
			continue
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("metricNames(%q) = %q, want %q", tc.expr, got, tc.want)
		}
	}
	for _, expr := range []string{`{__name__=~"proxy_.*"}`, `sum({job="x"})`, `x{a="b"`, `rate(x[5m)`, `x{a="b}`} {
		if got, err := metricNames(expr); err == nil {
			t.Errorf("metricNames(%q) = %q, want an error", expr, got)
		}
	}
}

func TestSubstitute(t *testing.T) {
	vals := map[string]string{"job": "kubernetes-pods", "org": ".*"}
	got, err := substitute(`rate(m{job="$job", o=~"${org}", p=~"[[org]]", q="${job:raw}"}[$__rate_interval]) offset $__range`, vals)
	if err != nil {
		t.Fatal(err)
	}
	want := `rate(m{job="kubernetes-pods", o=~".*", p=~".*", q="kubernetes-pods"}[5m]) offset 5m`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	if _, err := substitute(`m{job="$jbo"}`, vals); err == nil || !strings.Contains(err.Error(), "$jbo") {
		t.Errorf("an unknown variable: err = %v, want one naming $jbo", err)
	}
}

func TestVariableQueryExpr(t *testing.T) {
	for q, want := range map[string]string{
		`label_values(m{job="$job"}, namespace)`: `m{job="$job"}`,
		`label_values(namespace)`:                "",
		`query_result(sum(m))`:                   `sum(m)`,
		`label_names()`:                          "",
	} {
		if got := variableQueryExpr(q); got != want {
			t.Errorf("variableQueryExpr(%q) = %q, want %q", q, got, want)
		}
	}
}

func TestCurrentValue(t *testing.T) {
	for raw, want := range map[string]string{
		`"a"`:        "a",
		`["a","b"]`:  "a|b",
		`["$__all"]`: ".*",
		`"$__all"`:   ".*",
	} {
		v := variable{Name: "v"}
		v.Current.Value = []byte(raw)
		got, err := v.currentValue()
		if err != nil || got != want {
			t.Errorf("current value %s: got %q, %v; want %q", raw, got, err, want)
		}
	}
	v := variable{Name: "v", AllValue: "org-.*"}
	v.Current.Value = []byte(`"$__all"`)
	if got, _ := v.currentValue(); got != "org-.*" {
		t.Errorf("All with allValue: got %q", got)
	}
}
