package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// promql parses as a Prometheus server does by default: no experimental functions.
var promql = parser.NewParser(parser.Options{})

// usageMetrics are the metrics of SPEC "Claude plan usage", which the
// dashboard and the alerts may name before testdata/metrics.golden lists them.
var usageMetrics = []string{
	"anthropic_ratelimit_unified_utilization", "anthropic_ratelimit_unified_reset_timestamp_seconds",
	"anthropic_ratelimit_unified_status", "anthropic_ratelimit_unified_representative_claim",
	"anthropic_ratelimit_limit", "anthropic_ratelimit_remaining", "anthropic_tokens_total",
	"anthropic_usage_parse_errors_total", "anthropic_usage_skipped_total",
}

// selectors parses expr and returns its vector selectors, those of range
// vectors and subqueries included.
func selectors(expr string) (vs []*parser.VectorSelector, err error) {
	e, err := promql.ParseExpr(expr)
	if err == nil {
		parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
			if v, ok := n.(*parser.VectorSelector); ok {
				vs = append(vs, v)
			}
			return nil
		})
	}
	return vs, err
}

// equalTo returns the value of v's label="value" matcher on label, "" if it has none.
func equalTo(v *parser.VectorSelector, label string) string {
	for _, m := range v.LabelMatchers {
		if m.Name == label && m.Type == labels.MatchEqual {
			return m.Value
		}
	}
	return ""
}

// metricNames returns the metric names that expr selects, sorted. A selector
// without a metric name ({__name__=~"..."} or {job="x"}) is an error, as its
// metrics could not be checked.
func metricNames(expr string) ([]string, error) {
	vs, err := selectors(expr)
	if err == nil && len(vs) == 0 {
		err = errors.New("names no metric")
	}
	var names []string
	for _, v := range vs {
		if v.Name == "" && err == nil {
			err = fmt.Errorf("a selector without a metric name: %s", v)
		}
		names = append(names, v.Name)
	}
	slices.Sort(names)
	return slices.Compact(names), err
}

// exportedMetrics reads the series names of a text exposition: each family's
// name, and its _bucket, _sum and _count series.
func exportedMetrics(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(f)
	var names []string
	for name, mf := range families {
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			names = append(names, name+"_bucket", name+"_sum", name+"_count")
		case dto.MetricType_SUMMARY:
			names = append(names, name, name+"_sum", name+"_count")
		default:
			names = append(names, name)
		}
	}
	return names, err
}

// query is one PromQL expression to check.
type query struct {
	where string // panel, variable or alert, for messages
	name  string // the recording rule's name
	expr  string // with the dashboard's variables replaced
}

// checkMetricNames parses the alerts and the dashboard's queries and checks
// that they name only metrics the proxy exports; it returns the names used.
func (in *inputs) checkMetricNames() (string, error) {
	golden, err := exportedMetrics(filepath.Join(in.repo, "testdata", "metrics.golden"))
	if err == nil && len(golden) == 0 {
		err = errors.New("no metric")
	}
	if err != nil {
		return "", fmt.Errorf("testdata/metrics.golden: %v", err)
	}
	allowed := slices.Concat(golden, usageMetrics, []string{"up"})
	qs := slices.Clone(in.queries)
	for _, a := range in.alerts {
		qs = append(qs, query{where: a.Alert, expr: a.Expr.String()})
	}
	var used, ps []string
	for _, q := range qs {
		names, err := metricNames(q.expr)
		if err != nil {
			ps = append(ps, fmt.Sprintf("%s: %v", q.where, err))
			continue
		}
		for _, name := range names {
			if !slices.Contains(allowed, name) {
				ps = append(ps, fmt.Sprintf("%s: %s is not a metric the proxy exports", q.where, name))
			}
		}
		used = append(used, names...)
	}
	slices.Sort(used)
	return strings.Join(slices.Compact(used), " "), problems(ps)
}
