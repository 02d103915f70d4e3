package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"
)

// usageMetrics are the metrics of SPEC "Claude plan usage", which the
// dashboard may show before testdata/metrics.golden lists them.
var usageMetrics = []string{
	"anthropic_ratelimit_unified_utilization",
	"anthropic_ratelimit_unified_reset_timestamp_seconds",
	"anthropic_ratelimit_unified_status",
	"anthropic_ratelimit_unified_representative_claim",
	"anthropic_ratelimit_limit",
	"anthropic_ratelimit_remaining",
	"anthropic_tokens_total",
	"anthropic_usage_parse_errors_total",
	"anthropic_usage_skipped_total",
}

// scrapeMetrics are written by Prometheus itself for every target.
var scrapeMetrics = []string{"up"}

// builtinValues replace Grafana's built-in variables when a query is
// checked: any valid duration will do for promtool.
var builtinValues = map[string]string{
	"__rate_interval": "5m",
	"__interval":      "5m",
	"__range":         "5m",
	"__interval_ms":   "300000",
	"__range_ms":      "300000",
	"__range_s":       "300",
}

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type panel struct {
	ID         int            `json:"id"`
	Title      string         `json:"title"`
	Type       string         `json:"type"`
	Datasource *datasourceRef `json:"datasource"`
	Targets    []struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource *datasourceRef `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's panels
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Datasource *datasourceRef  `json:"datasource"`
	Current    struct {
		Value json.RawMessage `json:"value"`
	} `json:"current"`
	AllValue string `json:"allValue"`
}

func parseDashboard(data []byte) (*dashboard, error) {
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("dashboard.json: %v", err)
	}
	return &d, nil
}

func (d *dashboard) variable(name string) (*variable, bool) {
	for i := range d.Templating.List {
		if d.Templating.List[i].Name == name {
			return &d.Templating.List[i], true
		}
	}
	return nil, false
}

// currentValue is the value Grafana starts with: the saved current value,
// its allValue (or ".*") for All, several values joined as a regex.
func (v *variable) currentValue() (string, error) {
	if len(v.Current.Value) == 0 {
		return "", fmt.Errorf("variable %s has no current value", v.Name)
	}
	var vals []string
	var one string
	if err := json.Unmarshal(v.Current.Value, &one); err == nil {
		vals = []string{one}
	} else if err := json.Unmarshal(v.Current.Value, &vals); err != nil {
		return "", fmt.Errorf("variable %s: current value %s is neither a string nor a list", v.Name, v.Current.Value)
	}
	if slices.Contains(vals, "$__all") {
		if v.AllValue != "" {
			return v.AllValue, nil
		}
		return ".*", nil
	}
	return strings.Join(vals, "|"), nil
}

// queryText is the query of a query variable, saved as a string or as an
// object with a query field.
func (v *variable) queryText() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	if json.Unmarshal(v.Query, &o) == nil {
		return o.Query
	}
	return ""
}

// variableQueryExpr returns the PromQL selector inside a Prometheus variable
// query: label_values(SELECTOR, label) or query_result(EXPR); "" for the
// forms without one (label_values(label), label_names(), metrics(re)).
func variableQueryExpr(q string) string {
	q = strings.TrimSpace(q)
	switch {
	case strings.HasPrefix(q, "label_values(") && strings.HasSuffix(q, ")"):
		inner := q[len("label_values(") : len(q)-1]
		comma := strings.LastIndex(inner, ",")
		if comma < 0 {
			return ""
		}
		return strings.TrimSpace(inner[:comma])
	case strings.HasPrefix(q, "query_result(") && strings.HasSuffix(q, ")"):
		return strings.TrimSpace(q[len("query_result(") : len(q)-1])
	}
	return ""
}

var variableRE = regexp.MustCompile(`\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w]+)?\]\]`)

// substitute replaces the dashboard variables in expr by vals, and the
// built-in ones by builtinValues. An unknown variable is an error.
func substitute(expr string, vals map[string]string) (string, error) {
	var unknown []string
	out := variableRE.ReplaceAllStringFunc(expr, func(m string) string {
		sm := variableRE.FindStringSubmatch(m)
		name := sm[1] + sm[2] + sm[3]
		if v, ok := builtinValues[name]; ok {
			return v
		}
		if v, ok := vals[name]; ok {
			return v
		}
		unknown = append(unknown, m)
		return m
	})
	if len(unknown) > 0 {
		return "", fmt.Errorf("unknown variable(s) %s", strings.Join(unknown, " "))
	}
	return out, nil
}

// goldenMetrics reads the sample names of a text exposition.
func goldenMetrics(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var names []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := s.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name := line
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name = line[:i]
		}
		if !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	return names, s.Err()
}

// query is one PromQL expression of the dashboard.
type query struct {
	where string // panel or variable, for messages
	name  string // the recording rule's name
	expr  string // with the variables replaced
}

func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

func checkDashboard(r *report, repo, out string) error {
	data, err := os.ReadFile(filepath.Join(repo, "k8s", "monitoring", "dashboard.json"))
	if err != nil {
		return err
	}
	d, err := parseDashboard(data)
	if err != nil {
		return err
	}
	panels := allPanels(d.Panels)
	r.check("dashboard.json has a uid, a title and a ${datasource} variable of Prometheus data sources", func() (string, error) {
		if d.UID == "" || d.Title == "" {
			return "", errors.New("uid or title is empty")
		}
		v, ok := d.variable("datasource")
		if !ok || v.Type != "datasource" || v.queryText() != "prometheus" {
			return "", errors.New(`no variable "datasource" of type datasource with query "prometheus"`)
		}
		return fmt.Sprintf("uid %s, %q, %d panels, %d variables", d.UID, d.Title, len(panels), len(d.Templating.List)), nil
	})
	r.check("every panel, query and query variable uses the ${datasource} variable", func() (string, error) {
		var problems []string
		ok := func(ds *datasourceRef) bool { return ds != nil && ds.UID == "${datasource}" }
		targets := 0
		for _, p := range panels {
			if p.Type == "row" {
				continue
			}
			if !ok(p.Datasource) {
				problems = append(problems, fmt.Sprintf("panel %d %q", p.ID, p.Title))
			}
			for _, t := range p.Targets {
				targets++
				if !ok(t.Datasource) {
					problems = append(problems, fmt.Sprintf("panel %d %q query %s", p.ID, p.Title, t.RefID))
				}
			}
		}
		for _, v := range d.Templating.List {
			if v.Type == "query" && !ok(v.Datasource) {
				problems = append(problems, "variable "+v.Name)
			}
		}
		if len(problems) > 0 {
			return "", fmt.Errorf("not ${datasource}: %s", strings.Join(problems, ", "))
		}
		return fmt.Sprintf("%d queries", targets), nil
	})

	// The queries, with every variable replaced.
	vals := map[string]string{}
	var queries []query
	r.check("every query's variables are defined; they are replaced by their current values, built-ins by 5m", func() (string, error) {
		var problems []string
		for _, v := range d.Templating.List {
			if v.Type == "datasource" {
				continue
			}
			val, err := v.currentValue()
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			vals[v.Name] = val
		}
		add := func(where, name, expr string) {
			s, err := substitute(expr, vals)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", where, err))
				return
			}
			queries = append(queries, query{where: where, name: name, expr: s})
		}
		for _, v := range d.Templating.List {
			if v.Type != "query" {
				continue
			}
			q := v.queryText()
			expr := variableQueryExpr(q)
			if expr == "" {
				problems = append(problems, fmt.Sprintf("variable %s: query %q has no PromQL selector to check", v.Name, q))
				continue
			}
			add("variable "+v.Name, "dashboard:variable_"+v.Name, expr)
		}
		for _, p := range panels {
			for _, t := range p.Targets {
				where := fmt.Sprintf("panel %d %q query %s", p.ID, p.Title, t.RefID)
				if strings.TrimSpace(t.Expr) == "" {
					problems = append(problems, where+": no expr")
					continue
				}
				add(where, fmt.Sprintf("dashboard:panel_%d_%s", p.ID, t.RefID), t.Expr)
			}
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		var list []string
		for _, v := range d.Templating.List {
			if v.Type != "datasource" {
				list = append(list, fmt.Sprintf("$%s=%q", v.Name, vals[v.Name]))
			}
		}
		return strings.Join(list, " "), nil
	})
	r.check("the queries are written as recording rules for promtool check rules", func() (string, error) {
		if len(queries) == 0 {
			return "", errors.New("no query")
		}
		var g ruleGroup
		g.Name = "dashboard"
		for _, q := range queries {
			if slices.ContainsFunc(g.Rules, func(ru rule) bool { return ru.Record == q.name }) {
				return "", fmt.Errorf("%s: two queries named %s (panel ids and refIds must be unique)", q.where, q.name)
			}
			g.Rules = append(g.Rules, rule{Record: q.name, Expr: q.expr})
		}
		y, err := yaml.Marshal(ruleGroups{Groups: []ruleGroup{g}})
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(out, y, 0o644); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d expressions -> %s", len(g.Rules), filepath.Base(out)), nil
	})
	r.check("the queries parse as PromQL and name only metrics of testdata/metrics.golden, SPEC's plan usage metrics and up", func() (string, error) {
		golden, err := goldenMetrics(filepath.Join(repo, "testdata", "metrics.golden"))
		if err != nil {
			return "", err
		}
		if len(golden) == 0 {
			return "", errors.New("testdata/metrics.golden lists no metric")
		}
		allowed := slices.Concat(golden, usageMetrics, scrapeMetrics)
		var used, problems []string
		for _, q := range queries {
			names, err := metricNames(q.expr)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", q.where, err))
				continue
			}
			for _, name := range names {
				if !slices.Contains(allowed, name) {
					problems = append(problems, fmt.Sprintf("%s: %s is not a metric the proxy exports", q.where, name))
				}
				if !slices.Contains(used, name) {
					used = append(used, name)
				}
			}
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		slices.Sort(used)
		return strings.Join(used, " "), nil
	})
	return nil
}
