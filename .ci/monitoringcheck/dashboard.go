package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/prometheus/prometheus/model/rulefmt"
	"go.yaml.in/yaml/v3"
)

// builtinValues replace Grafana's built-in variables: any valid duration will do.
var builtinValues = map[string]string{
	"__rate_interval": "5m", "__interval": "5m", "__range": "5m",
	"__interval_ms": "300000", "__range_ms": "300000", "__range_s": "300",
}

var (
	variableRE    = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]`)
	labelValuesRE = regexp.MustCompile(`^\s*label_values\((.+),\s*\w+\s*\)\s*$`) // a query variable's selector
)

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type datasourceRef struct {
	UID string `json:"uid"`
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
	Query      json.RawMessage `json:"query"` // a string, or an object with a query field
	Datasource *datasourceRef  `json:"datasource"`
	Current    struct {
		Value json.RawMessage `json:"value"`
	} `json:"current"`
	AllValue string `json:"allValue"`
}

// value is the value Grafana starts with: the saved current value, its
// allValue (or ".*") for All, several values joined as a regex.
func (v *variable) value() (string, error) {
	var one string
	var vals []string
	if json.Unmarshal(v.Current.Value, &one) == nil {
		vals = []string{one}
	} else if json.Unmarshal(v.Current.Value, &vals) != nil {
		return "", fmt.Errorf("variable %s: current value %q is neither a string nor a list",
			v.Name, v.Current.Value)
	}
	if slices.Contains(vals, "$__all") {
		return cmp.Or(v.AllValue, ".*"), nil
	}
	return strings.Join(vals, "|"), nil
}

func (v *variable) queryText() string {
	var o struct {
		Query string `json:"query"`
	}
	if json.Unmarshal(v.Query, &o.Query) != nil {
		_ = json.Unmarshal(v.Query, &o)
	}
	return o.Query
}

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

func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(append(out, p), allPanels(p.Panels)...)
	}
	return out
}

// readDashboard parses dashboard.json and gathers its queries, their
// variables replaced by their current values.
func (in *inputs) readDashboard() error {
	d := &dashboard{}
	if err := json.Unmarshal(in.dashboardJSON, d); err != nil {
		return fmt.Errorf("dashboard.json: %v", err)
	}
	in.dashboard, in.vars = d, map[string]string{}
	var list []string
	for _, v := range d.Templating.List {
		if v.Type != "datasource" {
			val, err := v.value()
			if err != nil {
				in.unknownVariables = append(in.unknownVariables, err.Error())
			}
			in.vars[v.Name] = val
			list = append(list, fmt.Sprintf("$%s=%q", v.Name, val))
		}
	}
	in.varsText = strings.Join(list, " ")
	add := func(where, name, expr string, ds *datasourceRef) {
		if ds == nil || ds.UID != "${datasource}" {
			in.notDatasource = append(in.notDatasource, where)
		}
		s, err := substitute(expr, in.vars)
		if err == nil && strings.TrimSpace(expr) == "" {
			err = errors.New("no PromQL expression")
		}
		if err != nil {
			in.unknownVariables = append(in.unknownVariables, fmt.Sprintf("%s: %v", where, err))
			return
		}
		in.queries = append(in.queries, query{where: where, name: name, expr: s})
	}
	for _, v := range d.Templating.List {
		if m := labelValuesRE.FindStringSubmatch(v.queryText()); v.Type == "query" && m != nil {
			add("variable "+v.Name, "dashboard:variable_"+v.Name, m[1], v.Datasource)
		} else if v.Type == "query" {
			in.unknownVariables = append(in.unknownVariables, fmt.Sprintf(
				"variable %s: no label_values(SELECTOR, label) to check in %q", v.Name, v.queryText()))
		}
	}
	for _, p := range allPanels(d.Panels) {
		where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
		if p.Type != "row" && (p.Datasource == nil || p.Datasource.UID != "${datasource}") {
			in.notDatasource = append(in.notDatasource, where)
		}
		for _, t := range p.Targets {
			name := fmt.Sprintf("dashboard:panel_%d_%s", p.ID, t.RefID)
			add(where+" query "+t.RefID, name, t.Expr, t.Datasource)
		}
	}
	return nil
}

func (in *inputs) checkDashboard() (string, error) {
	d := in.dashboard
	isDatasource := func(v variable) bool {
		return v.Name == "datasource" && v.Type == "datasource" && v.queryText() == "prometheus"
	}
	if d.UID == "" || d.Title == "" || !slices.ContainsFunc(d.Templating.List, isDatasource) {
		return "", errors.New(`no uid, no title, or no variable "datasource" of type datasource with query ` +
			`"prometheus"`)
	}
	return fmt.Sprintf("uid %s, %q, %d panels, %d variables", d.UID, d.Title, len(allPanels(d.Panels)),
		len(d.Templating.List)), nil
}

func (in *inputs) writeDashboardRules() (string, error) {
	g := rulefmt.RuleGroup{Name: "dashboard"}
	for _, q := range in.queries {
		if slices.ContainsFunc(g.Rules, func(ru rulefmt.Rule) bool { return ru.Record == q.name }) {
			return "", fmt.Errorf("%s: two queries named %s (panel ids and refIds must be unique)",
				q.where, q.name)
		}
		g.Rules = append(g.Rules, rulefmt.Rule{Record: q.name, Expr: q.expr})
	}
	if len(g.Rules) == 0 {
		return "", errors.New("no query")
	}
	y, err := yaml.Marshal(rulefmt.RuleGroups{Groups: []rulefmt.RuleGroup{g}})
	if err == nil {
		err = os.WriteFile(in.dashboardOut, y, 0o644)
	}
	return fmt.Sprintf("%d expressions -> %s", len(g.Rules), filepath.Base(in.dashboardOut)), err
}
