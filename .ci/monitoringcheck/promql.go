package main

import (
	"errors"
	"fmt"
	"slices"

	"github.com/prometheus/prometheus/promql/parser"
)

// promql parses as a Prometheus server does by default: no experimental functions.
var promql = parser.NewParser(parser.Options{})

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
