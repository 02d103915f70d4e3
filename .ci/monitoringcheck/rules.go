package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// dashboardKey is the ConfigMap data key the Grafana sidecar writes to a file
// of that name; configMapGenerator takes it from dashboard.json.
const dashboardKey = "anthropic-oauth-proxy.json"

var (
	severities  = []string{"critical", "warning", "info"}       // the values of an alert's severity label
	annotations = []string{"summary", "description", "runbook"} // the annotations every alert carries
)

// testFile is a promtool test rules file, as far as the checks read it
// (promtool's own types are in its main package).
type testFile struct {
	RuleFiles []string `json:"rule_files"`
	Tests     []struct {
		Name          string `json:"name"`
		AlertRuleTest []struct {
			Alertname string `json:"alertname"`
			ExpAlerts []any  `json:"exp_alerts"`
		} `json:"alert_rule_test"`
	} `json:"tests"`
}

// inputs are what the checks read, and the files they write.
type inputs struct {
	repo, ns               string                         // ns: the base kustomization's namespace
	rulesOut, dashboardOut string                         // the rules files to write
	objects                []metav1.PartialObjectMetadata // the objects kubectl kustomize k8s/monitoring renders
	rule                   monitoringv1.PrometheusRule
	cm                     corev1.ConfigMap
	strict                 []string            // fields the types of rule and cm lack, duplicate keys
	alerts                 []monitoringv1.Rule // the alerting rules of rule
	dashboardJSON          []byte
	dashboard              *dashboard
	vars                   map[string]string // the dashboard variables' current values
	varsText               string            // the same, for the report
	queries                []query           // the dashboard's, variables replaced
	notDatasource          []string          // panels, queries and variables without ${datasource}
	unknownVariables       []string          // unknown variables, and queries that cannot be checked
}

func load(repo, rendered, rulesOut, dashboardOut string) (*inputs, error) {
	in := &inputs{repo: repo, rulesOut: rulesOut, dashboardOut: dashboardOut}
	data, err := os.ReadFile(rendered)
	if err == nil {
		in.ns, err = baseNamespace(repo)
	}
	if err == nil {
		in.dashboardJSON, err = os.ReadFile(filepath.Join(repo, "k8s", "monitoring", "dashboard.json"))
	}
	if err == nil {
		err = in.readDashboard()
	}
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for err == nil {
		if data, err = docs.Read(); err == nil {
			err = in.decode(data)
		}
	}
	if err != io.EOF {
		return nil, err
	}
	for _, g := range in.rule.Spec.Groups {
		for _, ru := range g.Rules {
			if ru.Alert != "" {
				in.alerts = append(in.alerts, ru)
			}
		}
	}
	return in, nil
}

// decode reads the metadata of one rendered object, and decodes a
// PrometheusRule or a ConfigMap into its API type as the API server does with
// strict field validation: a duplicate key, or a field the type lacks (names
// are case-sensitive), is a problem, and the rest is decoded all the same.
func (in *inputs) decode(doc []byte) error {
	var o metav1.PartialObjectMetadata
	if err := yaml.Unmarshal(doc, &o); err != nil {
		return fmt.Errorf("a rendered object: %v", err)
	} else if o.Kind == "" {
		return nil // an empty document
	}
	in.objects = append(in.objects, o)
	typed := map[string]any{"PrometheusRule": &in.rule, "ConfigMap": &in.cm}[o.Kind]
	if typed == nil {
		return nil
	}
	wrap := func(err error) string { return fmt.Sprintf("%s %s: %v", o.Kind, o.Name, err) }
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		in.strict = append(in.strict, wrap(err))
		j, err = yaml.YAMLToJSON(doc)
	}
	var unknown []error
	if err == nil {
		unknown, err = kjson.UnmarshalStrict(j, typed)
	}
	for _, u := range unknown {
		in.strict = append(in.strict, wrap(u))
	}
	if err != nil {
		return errors.New(wrap(err))
	}
	return nil
}

// baseNamespace reads the namespace of the base kustomization, k8s/kustomization.yaml.
func baseNamespace(repo string) (string, error) {
	var k struct {
		Namespace string `json:"namespace"`
	}
	data, err := os.ReadFile(filepath.Join(repo, "k8s", "kustomization.yaml"))
	if err == nil {
		err = yaml.Unmarshal(data, &k)
	}
	if err == nil && k.Namespace == "" {
		err = errors.New("k8s/kustomization.yaml sets no namespace")
	}
	return k.Namespace, err
}

// problems joins what a check found wrong into its error, nil if nothing.
func problems(ps []string) error {
	if len(ps) == 0 {
		return nil
	}
	return errors.New(strings.Join(ps, "; "))
}

func (in *inputs) checkObjects() (string, error) {
	var kinds, ps []string
	for _, o := range in.objects {
		kinds = append(kinds, o.APIVersion+" "+o.Kind)
		if o.Namespace != in.ns {
			ps = append(ps, fmt.Sprintf("%s %s is in namespace %q, want %q",
				o.Kind, o.Name, o.Namespace, in.ns))
		}
	}
	want := []string{"monitoring.coreos.com/v1 PrometheusRule", "v1 ConfigMap"}
	if slices.Sort(kinds); !slices.Equal(kinds, want) {
		ps = append(ps, fmt.Sprintf("renders %q, want %q", kinds, want))
	}
	detail := fmt.Sprintf("PrometheusRule %s, ConfigMap %s, namespace %s", in.rule.Name, in.cm.Name, in.ns)
	return detail, problems(ps)
}

func (in *inputs) checkConfigMap() (string, error) {
	if v := in.cm.Labels["grafana_dashboard"]; v != "1" {
		return "", fmt.Errorf(`label grafana_dashboard is %q, want "1"`, v)
	}
	if keys := slices.Sorted(maps.Keys(in.cm.Data)); !slices.Equal(keys, []string{dashboardKey}) {
		return "", fmt.Errorf("data keys %q, want only %s", keys, dashboardKey)
	}
	if in.cm.Data[dashboardKey] != string(in.dashboardJSON) {
		return "", fmt.Errorf("data %s differs from k8s/monitoring/dashboard.json", dashboardKey)
	}
	return fmt.Sprintf("grafana_dashboard=1, data key %s (%d bytes)", dashboardKey, len(in.dashboardJSON)), nil
}

func (in *inputs) writeRules() (string, error) {
	if len(in.alerts) == 0 {
		return "", errors.New("the PrometheusRule holds no alert")
	}
	y, err := yaml.Marshal(in.rule.Spec)
	if err == nil {
		err = os.WriteFile(in.rulesOut, y, 0o644)
	}
	return fmt.Sprintf("%d groups, %d alerts -> %s", len(in.rule.Spec.Groups), len(in.alerts),
		filepath.Base(in.rulesOut)), err
}

func (in *inputs) checkAlerts() (string, error) {
	var ps, names []string
	for _, a := range in.alerts {
		if slices.Contains(names, a.Alert) {
			ps = append(ps, a.Alert+": defined twice")
		}
		names = append(names, a.Alert)
		if s := a.Labels["severity"]; !slices.Contains(severities, s) {
			ps = append(ps, fmt.Sprintf("%s: severity %q, want one of %q", a.Alert, s, severities))
		}
		for _, k := range annotations {
			if strings.TrimSpace(a.Annotations[k]) == "" {
				ps = append(ps, fmt.Sprintf("%s: no %s annotation", a.Alert, k))
			}
		}
	}
	return strings.Join(names, " "), problems(ps)
}

func (in *inputs) checkSelectors() (string, error) {
	var ps []string
	job, ns := in.vars["job"], in.vars["namespace"]
	if job == "" || ns != in.ns {
		ps = append(ps, fmt.Sprintf("the dashboard's $job is %q, $namespace %q, want a job and %q",
			job, ns, in.ns))
	}
	for _, a := range in.alerts {
		vs, err := selectors(a.Expr.String())
		if err != nil {
			ps = append(ps, fmt.Sprintf("%s: %v", a.Alert, err))
		}
		for _, v := range vs {
			if equalTo(v, "job") != job || equalTo(v, "namespace") != in.ns {
				ps = append(ps, fmt.Sprintf("%s: %s, want job=%q, namespace=%q",
					a.Alert, v, job, in.ns))
			}
		}
	}
	return fmt.Sprintf("job=%q, namespace=%q", job, in.ns), problems(ps)
}

func (in *inputs) checkTests() (string, error) {
	files, err := filepath.Glob(filepath.Join(in.repo, "k8s", "monitoring", "tests", "*.yaml"))
	if err == nil && len(files) == 0 {
		err = errors.New("no test file")
	}
	if err != nil {
		return "", err
	}
	fires, silent := map[string]int{}, map[string]int{}
	var ps, counts []string
	isAlert := func(name string) bool {
		return slices.ContainsFunc(in.alerts, func(a monitoringv1.Rule) bool { return a.Alert == name })
	}
	for _, f := range files {
		var tf testFile
		data, err := os.ReadFile(f)
		if err == nil {
			err = yaml.Unmarshal(data, &tf)
		}
		if err != nil {
			return "", err
		}
		if want := filepath.Base(in.rulesOut); !slices.Equal(tf.RuleFiles, []string{want}) {
			ps = append(ps, fmt.Sprintf("%s: rule_files %q, want [%q] (the file .ci/monitoring extracts)",
				filepath.Base(f), tf.RuleFiles, want))
		}
		for _, t := range tf.Tests {
			for _, c := range t.AlertRuleTest {
				if !isAlert(c.Alertname) {
					ps = append(ps, fmt.Sprintf("%s: test %q names no alert of the rules: %q",
						filepath.Base(f), t.Name, c.Alertname))
				} else if len(c.ExpAlerts) > 0 {
					fires[c.Alertname]++
				} else {
					silent[c.Alertname]++
				}
			}
		}
	}
	for _, a := range in.alerts {
		n, s := fires[a.Alert], silent[a.Alert]
		if n == 0 || s == 0 {
			ps = append(ps, fmt.Sprintf("%s: %d cases where it fires, %d where it is silent, "+
				"want one of each", a.Alert, n, s))
		}
		counts = append(counts, fmt.Sprintf("%s %d/%d", a.Alert, n, s))
	}
	return fmt.Sprintf("%d files; firing/silent cases: %s", len(files), strings.Join(counts, ", ")), problems(ps)
}
