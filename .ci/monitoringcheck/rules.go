package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// dashboardKey is the ConfigMap data key the Grafana sidecar writes to a file
// of that name; configMapGenerator takes it from dashboard.json.
const dashboardKey = "anthropic-oauth-proxy.json"

// severities are the values an alert's severity label may take.
var severities = []string{"critical", "warning", "info"}

// annotationsWanted are the annotations every alert carries.
var annotationsWanted = []string{"summary", "description", "runbook"}

// object is one rendered manifest, as far as the checks read it.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Data map[string]string `json:"data"`
	Spec json.RawMessage   `json:"spec"`
}

// ruleGroups is a Prometheus rules file, and the spec of a PrometheusRule.
type ruleGroups struct {
	Groups []ruleGroup `json:"groups"`
}

type ruleGroup struct {
	Name  string `json:"name"`
	Rules []rule `json:"rules"`
}

type rule struct {
	Alert       string            `json:"alert,omitempty"`
	Record      string            `json:"record,omitempty"`
	Expr        string            `json:"expr"`
	For         string            `json:"for,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// testFile is a promtool test rules file, as far as the checks read it.
type testFile struct {
	RuleFiles []string `json:"rule_files"`
	Tests     []struct {
		Name          string `json:"name"`
		AlertRuleTest []struct {
			EvalTime  string            `json:"eval_time"`
			Alertname string            `json:"alertname"`
			ExpAlerts []json.RawMessage `json:"exp_alerts"`
		} `json:"alert_rule_test"`
	} `json:"tests"`
}

// splitDocuments parses kubectl kustomize output: YAML documents separated by "---" lines.
func splitDocuments(data []byte) ([]object, error) {
	var objs []object
	for i, doc := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(data), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var o object
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		objs = append(objs, o)
	}
	return objs, nil
}

// baseNamespace reads the namespace of the base kustomization, k8s/kustomization.yaml.
func baseNamespace(repo string) (string, error) {
	data, err := os.ReadFile(filepath.Join(repo, "k8s", "kustomization.yaml"))
	if err != nil {
		return "", err
	}
	var k struct {
		Namespace string `json:"namespace"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		return "", fmt.Errorf("k8s/kustomization.yaml: %v", err)
	}
	if k.Namespace == "" {
		return "", errors.New("k8s/kustomization.yaml sets no namespace")
	}
	return k.Namespace, nil
}

// matcherValues returns the distinct values of the equality matchers
// (label="value") on label in expr.
func matcherValues(expr, label string) []string {
	re := regexp.MustCompile(`[{,]\s*` + regexp.QuoteMeta(label) + `\s*=\s*"([^"]*)"`)
	var vals []string
	for _, m := range re.FindAllStringSubmatch(expr, -1) {
		if !slices.Contains(vals, m[1]) {
			vals = append(vals, m[1])
		}
	}
	return vals
}

func checkRules(r *report, repo, rendered, out string) error {
	data, err := os.ReadFile(rendered)
	if err != nil {
		return err
	}
	objs, err := splitDocuments(data)
	if err != nil {
		return fmt.Errorf("%s: %v", rendered, err)
	}
	ns, err := baseNamespace(repo)
	if err != nil {
		return err
	}
	dashboard, err := os.ReadFile(filepath.Join(repo, "k8s", "monitoring", "dashboard.json"))
	if err != nil {
		return err
	}

	var promRule, configMap *object
	r.check("kubectl kustomize k8s/monitoring renders one PrometheusRule and one ConfigMap, in the base's namespace", func() (string, error) {
		var kinds []string
		for i := range objs {
			o := &objs[i]
			kinds = append(kinds, o.Kind)
			switch {
			case o.Kind == "PrometheusRule" && o.APIVersion == "monitoring.coreos.com/v1" && promRule == nil:
				promRule = o
			case o.Kind == "ConfigMap" && o.APIVersion == "v1" && configMap == nil:
				configMap = o
			default:
				return "", fmt.Errorf("unexpected object %s %s/%s", o.APIVersion, o.Kind, o.Metadata.Name)
			}
			if o.Metadata.Namespace != ns {
				return "", fmt.Errorf("%s %s is in namespace %q, want %q (k8s/kustomization.yaml)", o.Kind, o.Metadata.Name, o.Metadata.Namespace, ns)
			}
		}
		if promRule == nil || configMap == nil {
			return "", fmt.Errorf("rendered kinds %v, want PrometheusRule and ConfigMap", kinds)
		}
		return fmt.Sprintf("PrometheusRule %s, ConfigMap %s, namespace %s", promRule.Metadata.Name, configMap.Metadata.Name, ns), nil
	})
	if configMap != nil {
		r.check("the dashboard ConfigMap is labelled for the Grafana sidecar and holds dashboard.json unchanged", func() (string, error) {
			if v := configMap.Metadata.Labels["grafana_dashboard"]; v != "1" {
				return "", fmt.Errorf(`label grafana_dashboard is %q, want "1"`, v)
			}
			if len(configMap.Data) != 1 {
				return "", fmt.Errorf("data has %d keys, want only %s", len(configMap.Data), dashboardKey)
			}
			got, ok := configMap.Data[dashboardKey]
			if !ok {
				return "", fmt.Errorf("no data key %s", dashboardKey)
			}
			if got != string(dashboard) {
				return "", fmt.Errorf("data %s differs from k8s/monitoring/dashboard.json", dashboardKey)
			}
			return fmt.Sprintf("grafana_dashboard=1, data key %s (%d bytes)", dashboardKey, len(got)), nil
		})
	}
	if promRule == nil {
		return errors.New("no PrometheusRule to check")
	}

	var spec ruleGroups
	if err := json.Unmarshal(promRule.Spec, &spec); err != nil {
		return fmt.Errorf("PrometheusRule spec: %v", err)
	}
	var alerts []rule
	for _, g := range spec.Groups {
		for _, ru := range g.Rules {
			if ru.Alert != "" {
				alerts = append(alerts, ru)
			}
		}
	}
	r.check("the PrometheusRule's spec is written as a plain rules file for promtool", func() (string, error) {
		if len(alerts) == 0 {
			return "", errors.New("the PrometheusRule holds no alert")
		}
		// The spec as rendered, not the struct above, so that promtool sees
		// every field (and refuses any it does not know).
		var generic any
		if err := json.Unmarshal(promRule.Spec, &generic); err != nil {
			return "", err
		}
		y, err := yaml.Marshal(generic)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(out, y, 0o644); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d groups, %d alerts -> %s", len(spec.Groups), len(alerts), filepath.Base(out)), nil
	})
	r.check("every alert is named once and has a severity label and summary, description and runbook annotations", func() (string, error) {
		var problems, names []string
		for _, a := range alerts {
			if slices.Contains(names, a.Alert) {
				problems = append(problems, a.Alert+": defined twice")
			}
			names = append(names, a.Alert)
			if !slices.Contains(severities, a.Labels["severity"]) {
				problems = append(problems, fmt.Sprintf("%s: severity %q, want one of %v", a.Alert, a.Labels["severity"], severities))
			}
			for _, k := range annotationsWanted {
				if strings.TrimSpace(a.Annotations[k]) == "" {
					problems = append(problems, fmt.Sprintf("%s: no %s annotation", a.Alert, k))
				}
			}
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		return strings.Join(names, " "), nil
	})

	// The job every alert and the dashboard select.
	r.check("every alert selects the proxy's job and the base's namespace, as the dashboard's variables do", func() (string, error) {
		var jobs []string
		var problems []string
		for _, a := range alerts {
			j := matcherValues(a.Expr, "job")
			n := matcherValues(a.Expr, "namespace")
			if len(j) != 1 {
				problems = append(problems, fmt.Sprintf("%s: job matchers %q, want one value", a.Alert, j))
			} else if !slices.Contains(jobs, j[0]) {
				jobs = append(jobs, j[0])
			}
			if len(n) != 1 || n[0] != ns {
				problems = append(problems, fmt.Sprintf("%s: namespace matchers %q, want %q", a.Alert, n, ns))
			}
		}
		if len(jobs) > 1 {
			problems = append(problems, fmt.Sprintf("the alerts select different jobs %q", jobs))
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		d, err := parseDashboard(dashboard)
		if err != nil {
			return "", err
		}
		for name, want := range map[string]string{"job": jobs[0], "namespace": ns} {
			v, ok := d.variable(name)
			if !ok {
				return "", fmt.Errorf("dashboard.json has no variable %q", name)
			}
			if got, _ := v.currentValue(); got != want {
				return "", fmt.Errorf("dashboard variable %s defaults to %q, the alerts select %q", name, got, want)
			}
		}
		return fmt.Sprintf(`job=%q, namespace=%q`, jobs[0], ns), nil
	})

	r.check("k8s/monitoring/tests: every alert has a test case where it fires and one where it does not", func() (string, error) {
		files, err := filepath.Glob(filepath.Join(repo, "k8s", "monitoring", "tests", "*.yaml"))
		if err != nil {
			return "", err
		}
		if len(files) == 0 {
			return "", errors.New("no test file")
		}
		fires := map[string]int{}
		silent := map[string]int{}
		var problems []string
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return "", err
			}
			var tf testFile
			if err := yaml.Unmarshal(data, &tf); err != nil {
				return "", fmt.Errorf("%s: %v", filepath.Base(f), err)
			}
			if !slices.Equal(tf.RuleFiles, []string{filepath.Base(out)}) {
				problems = append(problems, fmt.Sprintf("%s: rule_files %q, want [%q] (the file .ci/monitoring extracts)", filepath.Base(f), tf.RuleFiles, filepath.Base(out)))
			}
			for _, t := range tf.Tests {
				for _, c := range t.AlertRuleTest {
					if !slices.ContainsFunc(alerts, func(a rule) bool { return a.Alert == c.Alertname }) {
						problems = append(problems, fmt.Sprintf("%s: test %q names no alert of the rules: %q", filepath.Base(f), t.Name, c.Alertname))
					}
					if len(c.ExpAlerts) > 0 {
						fires[c.Alertname]++
					} else {
						silent[c.Alertname]++
					}
				}
			}
		}
		var counts []string
		for _, a := range alerts {
			if fires[a.Alert] == 0 {
				problems = append(problems, a.Alert+": no case where it fires")
			}
			if silent[a.Alert] == 0 {
				problems = append(problems, a.Alert+": no case where it stays silent")
			}
			counts = append(counts, fmt.Sprintf("%s %d/%d", a.Alert, fires[a.Alert], silent[a.Alert]))
		}
		if len(problems) > 0 {
			sort.Strings(problems)
			return "", errors.New(strings.Join(problems, "; "))
		}
		return fmt.Sprintf("%d files; firing/silent cases: %s", len(files), strings.Join(counts, ", ")), nil
	})
	return nil
}
