package main

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/utils/ptr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The product contract's fixed values the manifests are held to.
const (
	namespaceName = "anthropic-oauth-proxy"
	tailnetName   = "anthropic-oauth-proxy" // the MagicDNS name Aperture routes to
	configKey     = "config.toml"
	exampleConfig = "anthropic-oauth-proxy.example.toml"
	drainSeconds  = 5 // the program's drain timeout after SIGTERM (SPEC, Lifecycle)
)

// k8sFiles are the files SPEC lists under k8s/, in kustomization order.
var k8sFiles = []string{"namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "deployment.yaml", "service.yaml"}

var (
	listenPort = regexp.MustCompile(`(?m)^listen_addr\s*=\s*"[^"]*:(\d+)"`)
	goMemLimit = regexp.MustCompile(`^([0-9]+)(|B|KiB|MiB|GiB|TiB)$`) // as the Go runtime reads it
)

// manifests are the rendered objects, those of the kinds the checks read
// decoded into their Kubernetes types, and the image they run.
type manifests struct {
	repo    string
	img     *dockerfile
	objects []object
	strict  []string // fields the objects' types do not have, and duplicate keys
	ns      corev1.Namespace
	sa      corev1.ServiceAccount
	cm      corev1.ConfigMap
	deploy  appsv1.Deployment
	svc     corev1.Service
	pod     *corev1.PodSpec   // the Deployment's pod template
	c       *corev1.Container // its first container, or an empty one
	port    int32             // the container's only port, or -1
}

// object is one rendered document.
type object struct {
	metav1.PartialObjectMetadata
	doc []byte // YAML
}

// loadManifests splits the rendered file (kubectl kustomize output) into
// objects and decodes the kinds the checks read.
func loadManifests(repo, rendered string, img *dockerfile) (*manifests, error) {
	data, err := os.ReadFile(rendered)
	if err != nil {
		return nil, err
	}
	m := &manifests{repo: repo, img: img, c: &corev1.Container{}, port: -1}
	typed := map[string]any{"Namespace": &m.ns, "ServiceAccount": &m.sa, "ConfigMap": &m.cm,
		"Deployment": &m.deploy, "Service": &m.svc}
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := docs.Read()
		if err == io.EOF {
			break
		}
		o := object{doc: doc}
		if err == nil {
			err = yaml.Unmarshal(doc, &o.PartialObjectMetadata)
		}
		if v, ok := typed[o.Kind]; ok && err == nil {
			var problems []error
			problems, err = decodeStrict(doc, v)
			for _, p := range problems {
				m.strict = append(m.strict, fmt.Sprintf("%s %s: %v", o.Kind, o.Name, p))
			}
		}
		if err != nil {
			return nil, fmt.Errorf("rendered manifests: %s %s: %w", o.Kind, o.Name, err)
		}
		if o.Kind != "" { // else an empty document
			m.objects = append(m.objects, o)
		}
	}
	m.pod = &m.deploy.Spec.Template.Spec
	if len(m.pod.Containers) > 0 {
		m.c = &m.pod.Containers[0]
	}
	if len(m.c.Ports) == 1 {
		m.port = m.c.Ports[0].ContainerPort
	}
	return m, nil
}

// decodeStrict decodes a YAML document into v as the API server does with
// strict field validation: a duplicate key, or a field that v's type lacks
// (names are case-sensitive), is one of the problems returned, and the rest
// of the document is decoded all the same. (yaml.UnmarshalStrict would take
// a field whose name differs only in case.)
func decodeStrict(doc []byte, v any) (problems []error, err error) {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		problems = append(problems, err)
		if j, err = yaml.YAMLToJSON(doc); err != nil {
			return nil, err
		}
	}
	unknown, err := kjson.UnmarshalStrict(j, v)
	return append(problems, unknown...), err
}

var manifestChecks = []check[*manifests]{
	{"k8s/ holds exactly the files SPEC lists", func(m *manifests) (string, error) {
		entries, err := os.ReadDir(filepath.Join(m.repo, "k8s"))
		var got []string
		for _, e := range entries {
			if !e.IsDir() || e.Name() != "monitoring" { // its own kustomization, checked by .ci/monitoring
				got = append(got, e.Name())
			}
		}
		files := slices.Sorted(slices.Values(append(slices.Clone(k8sFiles), "kustomization.yaml")))
		return strings.Join(got, " "), cmp.Or(err, unequal(want{"k8s/", got, files}))
	}},
	{"kustomization.yaml lists the five manifests, says no secret even in a comment", func(m *manifests) (string, error) {
		data, err := os.ReadFile(filepath.Join(m.repo, "k8s", "kustomization.yaml"))
		var k struct {
			Namespace string
			Resources []string
		}
		if err == nil {
			err = yaml.Unmarshal(data, &k)
		}
		return "namespace " + k.Namespace, cmp.Or(err, unequal(want{"namespace", k.Namespace, namespaceName},
			want{"resources", k.Resources, k8sFiles},
			want{`the word "secret"`, bytes.Contains(bytes.ToLower(data), []byte("secret")), false}))
	}},
	{"renders exactly a Namespace, ServiceAccount, ConfigMap, Deployment and Service", func(m *manifests) (string, error) {
		var kinds []string
		for _, o := range m.objects {
			kinds = append(kinds, o.Kind)
		}
		slices.Sort(kinds)
		return fmt.Sprintf("%d objects", len(m.objects)), unequal(want{"the rendered kinds (no Ingress, no Secret)",
			kinds, []string{"ConfigMap", "Deployment", "Namespace", "Service", "ServiceAccount"}})
	}},
	{"every object decodes strictly as its type: no unknown or misspelt field", func(m *manifests) (string, error) {
		return "", require(len(m.strict) == 0, "%s", strings.Join(m.strict, "; "))
	}},
	{"no Secret: no object kind or field anywhere names a secret", func(m *manifests) (string, error) {
		for _, o := range m.objects {
			var tree any
			if err := yaml.Unmarshal(o.doc, &tree); err != nil {
				return "", err
			}
			if key := secretKey(tree, ""); key != "" || strings.Contains(strings.ToLower(o.Kind), "secret") {
				return "", fmt.Errorf("%s %s: %s", o.Kind, o.Name, cmp.Or(key, "its kind"))
			}
		}
		return "", nil
	}},
	{"every object is in namespace " + namespaceName, func(m *manifests) (string, error) {
		var wants []want
		for _, o := range m.objects {
			if o.Kind == "Namespace" {
				o.Namespace = o.Name
			}
			wants = append(wants, want{o.Kind + " " + o.Name + "'s namespace", o.Namespace, namespaceName})
		}
		return "", unequal(wants...)
	}},
	{"Namespace enforces the restricted Pod Security Standard", func(m *manifests) (string, error) {
		label := "pod-security.kubernetes.io/enforce"
		return "", unequal(want{"label " + label, m.ns.Labels[label], "restricted"})
	}},
	{"Deployment runs one replica, rolling with maxUnavailable 0 and maxSurge 1", func(m *manifests) (string, error) {
		// The single pod is replaced only once its successor is ready.
		zero, one := intstr.FromInt32(0), intstr.FromInt32(1)
		return "", unequal(want{"replicas", m.deploy.Spec.Replicas, ptr.To[int32](1)},
			want{"strategy", m.deploy.Spec.Strategy, appsv1.DeploymentStrategy{Type: appsv1.RollingUpdateDeploymentStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDeployment{MaxUnavailable: &zero, MaxSurge: &one}}})
	}},
	{"exactly one container, no init or ephemeral containers (no sidecar)", func(m *manifests) (string, error) {
		return m.c.Name, unequal(want{"containers", len(m.pod.Containers), 1},
			want{"init containers", len(m.pod.InitContainers), 0},
			want{"ephemeral containers", len(m.pod.EphemeralContainers), 0})
	}},
	{"no imagePullSecrets; public image with an explicit tag", func(m *manifests) (string, error) {
		name, tag, _ := strings.Cut(path.Base(m.c.Image), ":")
		ok := strings.HasPrefix(m.c.Image, "ghcr.io/") && name != "" && tag != "" && tag != "latest"
		return m.c.Image, cmp.Or(require(ok, "image %q, want ghcr.io/<owner>/<name>:<release tag>", m.c.Image),
			unequal(want{"imagePullSecrets", m.pod.ImagePullSecrets, []corev1.LocalObjectReference(nil)}))
	}},
	{"the Deployment never names tailscale (no sidecar, env, volume or mount)", func(m *manifests) (string, error) {
		for _, o := range m.objects {
			if o.Kind == "Deployment" && bytes.Contains(bytes.ToLower(o.doc), []byte("tailscale")) {
				return "", errors.New(`the rendered Deployment contains "tailscale"`)
			}
		}
		return "", nil
	}},
	{"no host namespaces, no command or args override, no env from other objects", func(m *manifests) (string, error) {
		var valueFrom []string
		for _, e := range m.c.Env {
			if e.ValueFrom != nil {
				valueFrom = append(valueFrom, e.Name)
			}
		}
		// The image's ENTRYPOINT and CONFIG_PATH are used as they are.
		return "", unequal(want{"hostNetwork", m.pod.HostNetwork, false}, want{"hostPID", m.pod.HostPID, false},
			want{"hostIPC", m.pod.HostIPC, false}, want{"command", m.c.Command, []string(nil)},
			want{"args", m.c.Args, []string(nil)}, want{"envFrom", m.c.EnvFrom, []corev1.EnvFromSource(nil)},
			want{"env with valueFrom", valueFrom, []string(nil)})
	}},
	{"the container port is the config's listen port and the image's EXPOSE", func(m *manifests) (string, error) {
		listen := "none"
		if l := listenPort.FindStringSubmatch(m.cm.Data[configKey]); l != nil {
			listen = l[1]
		}
		return fmt.Sprint(m.port), unequal(want{"the number of container ports", len(m.c.Ports), 1},
			want{"config.toml's listen_addr port", listen, strconv.Itoa(int(m.port))},
			want{"the Dockerfile's EXPOSE", m.img.port, m.port})
	}},
	{"startup, readiness and liveness probes GET /health on the container port", func(m *manifests) (string, error) {
		var wants []want
		for i, p := range []*corev1.Probe{m.c.StartupProbe, m.c.ReadinessProbe, m.c.LivenessProbe} {
			g := ptr.Deref(ptr.Deref(p, corev1.Probe{}).HTTPGet, corev1.HTTPGetAction{})
			wants = append(wants, want{[]string{"startup", "readiness", "liveness"}[i] + " probe's httpGet scheme, path, port",
				[]any{cmp.Or(g.Scheme, corev1.URISchemeHTTP), g.Path, m.resolve(g.Port)},
				[]any{corev1.URISchemeHTTP, "/health", m.port}})
		}
		return "", unequal(wants...)
	}},
	{"pod security context: non-root, the image's uid:gid, RuntimeDefault seccomp", func(m *manifests) (string, error) {
		return "", unequal(want{"securityContext", m.pod.SecurityContext, &corev1.PodSecurityContext{
			RunAsNonRoot: ptr.To(true), RunAsUser: &m.img.uid, RunAsGroup: &m.img.gid, SeccompProfile: runtimeDefault}})
	}},
	{"container security context: the pod's, read-only root, no privilege, drop ALL", func(m *manifests) (string, error) {
		return fmt.Sprintf("uid %d gid %d", m.img.uid, m.img.gid), unequal(want{"securityContext", m.c.SecurityContext,
			&corev1.SecurityContext{RunAsNonRoot: ptr.To(true), RunAsUser: &m.img.uid, RunAsGroup: &m.img.gid,
				SeccompProfile: runtimeDefault, ReadOnlyRootFilesystem: ptr.To(true), Privileged: ptr.To(false),
				AllowPrivilegeEscalation: ptr.To(false), Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}}})
	}},
	{"CPU and memory requests and limits are set, requests within limits", func(m *manifests) (string, error) {
		var parts []string
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			req, hasReq := m.c.Resources.Requests[res]
			limit, hasLimit := m.c.Resources.Limits[res]
			if !hasReq || !hasLimit || req.Cmp(limit) > 0 {
				return "", fmt.Errorf("%s request %s, limit %s: want both, the request within the limit", res, &req, &limit)
			}
			parts = append(parts, fmt.Sprintf("%s %s/%s", res, &req, &limit))
		}
		return strings.Join(parts, ", "), nil
	}},
	{"GOMEMLIMIT is below the memory limit, and at least 80% of it", func(m *manifests) (string, error) {
		var val string
		for _, e := range m.c.Env {
			if e.Name == "GOMEMLIMIT" {
				val = e.Value
			}
		}
		g := goMemLimit.FindStringSubmatch(val)
		if g == nil {
			return "", fmt.Errorf("GOMEMLIMIT %q, want a byte count the Go runtime reads, like 110MiB", val)
		}
		soft, err := resource.ParseQuantity(g[1] + strings.TrimSuffix(g[2], "B")) // 110MiB is 110Mi
		limit := m.c.Resources.Limits[corev1.ResourceMemory]
		ratio := soft.AsApproximateFloat64() / limit.AsApproximateFloat64()
		ok := err == nil && soft.Cmp(limit) < 0 && ratio >= 0.8
		return fmt.Sprintf("%s is %.0f%% of %s", val, 100*ratio, &limit),
			require(ok, "GOMEMLIMIT %s = %d B, memory limit %s = %d B", val, soft.Value(), &limit, limit.Value())
	}},
	{fmt.Sprintf("preStop sleep + %d s drain < terminationGracePeriodSeconds", drainSeconds),
		func(m *manifests) (string, error) {
			// The pod leaves the Service endpoints during the sleep, before SIGTERM.
			preStop := ptr.Deref(ptr.Deref(m.c.Lifecycle, corev1.Lifecycle{}).PreStop, corev1.LifecycleHandler{})
			sleep := ptr.Deref(preStop.Sleep, corev1.SleepAction{}).Seconds
			grace := ptr.Deref(m.pod.TerminationGracePeriodSeconds, 0)
			detail := fmt.Sprintf("%d s + %d s < %d s", sleep, drainSeconds, grace)
			return detail, require(sleep > 0 && sleep+drainSeconds < grace,
				"preStop sleep %d s + drain %d s, grace period %d s", sleep, drainSeconds, grace)
		}},
	{"automountServiceAccountToken is false on the pod and its ServiceAccount", func(m *manifests) (string, error) {
		return "", unequal(want{"the pod's serviceAccountName", m.pod.ServiceAccountName, m.sa.Name},
			want{"the pod's automountServiceAccountToken", m.pod.AutomountServiceAccountToken, ptr.To(false)},
			want{"the ServiceAccount's automountServiceAccountToken", m.sa.AutomountServiceAccountToken, ptr.To(false)})
	}},
	{"Prometheus annotations scrape /metrics on the container port", func(m *manifests) (string, error) {
		a := m.deploy.Spec.Template.Annotations
		return "", unequal(want{"the pod's prometheus.io annotations",
			[]string{a["prometheus.io/scrape"], a["prometheus.io/path"], a["prometheus.io/port"]},
			[]string{"true", "/metrics", strconv.Itoa(int(m.port))}})
	}},
	{"the ConfigMap is mounted read-only where the image's CONFIG_PATH points", func(m *manifests) (string, error) {
		for _, v := range m.pod.Volumes {
			i := slices.IndexFunc(m.c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == v.Name })
			if v.ConfigMap == nil || v.ConfigMap.Name != m.cm.Name || i < 0 {
				continue
			}
			file := configKey
			for _, it := range v.ConfigMap.Items {
				if it.Key == configKey {
					file = it.Path
				}
			}
			vm := m.c.VolumeMounts[i]
			return m.img.configPath, unequal(want{"the mounted config.toml", path.Join(vm.MountPath, file), m.img.configPath},
				want{"readOnly", vm.ReadOnly, true}, want{"subPath", vm.SubPath, ""})
		}
		return "", fmt.Errorf("no mounted volume from ConfigMap %s", m.cm.Name)
	}},
	{"the ConfigMap's config.toml is byte-identical to " + exampleConfig, func(m *manifests) (string, error) {
		data, err := os.ReadFile(filepath.Join(m.repo, exampleConfig))
		got, example := m.cm.Data[configKey], string(data)
		n := 0 // the length of their common start
		for n < min(len(got), len(example)) && got[n] == example[n] {
			n++
		}
		return fmt.Sprintf("%d bytes", len(example)), cmp.Or(err, require(got == example,
			"from line %d on, the ConfigMap has %q, the file %q", strings.Count(got[:n], "\n")+1,
			got[n:min(n+40, len(got))], example[n:min(n+40, len(example))]))
	}},
	{"Service: a ClusterIP with the two Tailscale Operator annotations, nothing more", func(m *manifests) (string, error) {
		tailscale := maps.Clone(m.svc.Annotations)
		maps.DeleteFunc(tailscale, func(k, _ string) bool { return !strings.Contains(k, "tailscale") })
		return fmt.Sprintf("hostname %q", tailscale["tailscale.com/hostname"]), unequal(
			want{"type", m.svc.Spec.Type, corev1.ServiceTypeClusterIP},
			want{"loadBalancerClass", m.svc.Spec.LoadBalancerClass, (*string)(nil)},
			want{"annotations", tailscale,
				map[string]string{"tailscale.com/expose": "true", "tailscale.com/hostname": tailnetName}})
	}},
	{"the Service hostname is a valid DNS label", func(m *manifests) (string, error) {
		h := m.svc.Annotations["tailscale.com/hostname"]
		problems := validation.IsDNS1123Label(h)
		return "", require(len(problems) == 0, "%q: %s", h, strings.Join(problems, "; "))
	}},
	{"the Service selects the pod and serves the container port on the same port", func(m *manifests) (string, error) {
		s, pod := m.svc.Spec, labels.Set(m.deploy.Spec.Template.Labels)
		deploy, err := metav1.LabelSelectorAsSelector(m.deploy.Spec.Selector)
		if err != nil {
			return "", err
		}
		if len(s.Selector) == 0 || !labels.SelectorFromSet(s.Selector).Matches(pod) || !deploy.Matches(pod) {
			return "", fmt.Errorf("service selector %v, deployment selector %v, pod labels %v", s.Selector, deploy, pod)
		}
		var ports []int32
		for _, p := range s.Ports {
			ports = append(ports, p.Port, m.resolve(p.TargetPort))
		}
		return fmt.Sprintf("tailnet clients use http://%s:%d", tailnetName, m.port),
			unequal(want{"the Service's port and target port", ports, []int32{m.port, m.port}})
	}},
}

var runtimeDefault = &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}

// resolve returns the number of a port given by number or by the container's port name.
func (m *manifests) resolve(p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, c := range m.c.Ports {
		if c.Name == p.StrVal {
			return c.ContainerPort
		}
	}
	return -1
}

// secretKey returns the path of the first map key in v that names a secret.
func secretKey(v any, at string) string {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if strings.Contains(strings.ToLower(k), "secret") {
				return at + "." + k
			}
			if p := secretKey(e, at+"."+k); p != "" {
				return p
			}
		}
	case []any:
		for i, e := range v {
			if p := secretKey(e, fmt.Sprintf("%s[%d]", at, i)); p != "" {
				return p
			}
		}
	}
	return ""
}
