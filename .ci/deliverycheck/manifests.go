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
	// drainSeconds is the program's drain timeout after SIGTERM (SPEC, Lifecycle).
	drainSeconds = 5
)

// k8sFiles are the files SPEC lists under k8s/, in kustomization order.
var k8sFiles = []string{"namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "deployment.yaml", "service.yaml"}

// manifests are the rendered objects, each kind the checks read decoded into
// its Kubernetes type.
type manifests struct {
	repo     string
	img      *image
	objects  []object
	unknown  []string // fields the objects' types do not have, and duplicate keys
	ns       corev1.Namespace
	sa       corev1.ServiceAccount
	cm       corev1.ConfigMap
	deploy   appsv1.Deployment
	svc      corev1.Service
	pod      *corev1.PodSpec        // the Deployment's pod template
	c        *corev1.Container      // its first container, or an empty one
	security corev1.SecurityContext // the container's, with the pod's values for the fields it leaves unset
	port     int32                  // the container's only port, or -1
}

// object is one rendered document.
type object struct {
	metav1.PartialObjectMetadata
	doc []byte // YAML
}

// loadManifests splits kubectl kustomize output into objects and decodes the
// kinds the checks read; a field unknown to the kind's type is a failed check.
func loadManifests(repo string, rendered []byte, img *image) (*manifests, error) {
	m := &manifests{repo: repo, img: img, port: -1}
	typed := map[string]any{"Namespace": &m.ns, "ServiceAccount": &m.sa, "ConfigMap": &m.cm, "Deployment": &m.deploy, "Service": &m.svc}
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(rendered)))
	for {
		doc, err := docs.Read()
		if err == io.EOF {
			break
		}
		o := object{doc: doc}
		if err == nil {
			err = yaml.Unmarshal(doc, &o.PartialObjectMetadata)
		}
		if err != nil {
			return nil, fmt.Errorf("rendered manifests: %w", err)
		}
		if o.Kind == "" {
			continue // an empty document
		}
		m.objects = append(m.objects, o)
		if v, ok := typed[o.Kind]; ok {
			problems, err := decodeStrict(doc, v)
			if err != nil {
				return nil, fmt.Errorf("rendered %s %s: %w", o.Kind, o.Name, err)
			}
			for _, p := range problems {
				m.unknown = append(m.unknown, fmt.Sprintf("%s %s: %v", o.Kind, o.Name, p))
			}
		}
	}
	m.pod = &m.deploy.Spec.Template.Spec
	m.c = &corev1.Container{}
	if len(m.pod.Containers) > 0 {
		m.c = &m.pod.Containers[0]
	}
	if len(m.c.Ports) == 1 {
		m.port = m.c.Ports[0].ContainerPort
	}
	ps := ptr.Deref(m.pod.SecurityContext, corev1.PodSecurityContext{})
	m.security = ptr.Deref(m.c.SecurityContext, corev1.SecurityContext{})
	m.security.RunAsNonRoot = cmp.Or(m.security.RunAsNonRoot, ps.RunAsNonRoot)
	m.security.RunAsUser = cmp.Or(m.security.RunAsUser, ps.RunAsUser)
	m.security.RunAsGroup = cmp.Or(m.security.RunAsGroup, ps.RunAsGroup)
	m.security.SeccompProfile = cmp.Or(m.security.SeccompProfile, ps.SeccompProfile)
	return m, nil
}

var manifestChecks = []check[*manifests]{
	{"k8s/ holds exactly the files SPEC lists", func(m *manifests) (string, error) {
		entries, err := os.ReadDir(filepath.Join(m.repo, "k8s"))
		if err != nil {
			return "", err
		}
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		want := append(slices.Clone(k8sFiles), "kustomization.yaml")
		if slices.Sort(want); !slices.Equal(got, want) {
			return "", fmt.Errorf("got %v, want %v", got, want)
		}
		return strings.Join(got, " "), nil
	}},
	{"kustomization.yaml lists the five manifests and mentions no secret, even in a comment", func(m *manifests) (string, error) {
		data, err := os.ReadFile(filepath.Join(m.repo, "k8s", "kustomization.yaml"))
		if err != nil {
			return "", err
		}
		if bytes.Contains(bytes.ToLower(data), []byte("secret")) {
			return "", errors.New(`the file contains the word "secret"`)
		}
		var k struct {
			Namespace string
			Resources []string
		}
		if err := yaml.Unmarshal(data, &k); err != nil {
			return "", err
		}
		if !slices.Equal(k.Resources, k8sFiles) || k.Namespace != namespaceName {
			return "", fmt.Errorf("namespace %q resources %v, want %q %v", k.Namespace, k.Resources, namespaceName, k8sFiles)
		}
		return "namespace " + k.Namespace, nil
	}},
	{"kubectl kustomize renders exactly Namespace, ServiceAccount, ConfigMap, Deployment, Service", func(m *manifests) (string, error) {
		var kinds []string
		for _, o := range m.objects {
			kinds = append(kinds, o.Kind)
		}
		if slices.Sort(kinds); !slices.Equal(kinds, []string{"ConfigMap", "Deployment", "Namespace", "Service", "ServiceAccount"}) {
			return "", fmt.Errorf("rendered kinds %v (no Ingress, no Secret, nothing else)", kinds)
		}
		return fmt.Sprintf("%d objects", len(m.objects)), nil
	}},
	{"every object decodes strictly as its Kubernetes type: no unknown or misspelt field", func(m *manifests) (string, error) {
		if len(m.unknown) > 0 {
			return "", errors.New(strings.Join(m.unknown, "; "))
		}
		return "", nil
	}},
	{"no Secret: no object kind or field anywhere names a secret", func(m *manifests) (string, error) {
		isSecret := func(s string) bool { return strings.Contains(strings.ToLower(s), "secret") }
		for _, o := range m.objects {
			var tree any
			if err := yaml.Unmarshal(o.doc, &tree); err != nil {
				return "", err
			}
			if p := findKey(tree, "", isSecret); isSecret(o.Kind) || p != "" {
				return "", fmt.Errorf("%s %s has %s", o.Kind, o.Name, p)
			}
		}
		return "", nil
	}},
	{"every object is in namespace " + namespaceName, func(m *manifests) (string, error) {
		for _, o := range m.objects {
			ns := o.Namespace
			if o.Kind == "Namespace" {
				ns = o.Name
			}
			if ns != namespaceName {
				return "", fmt.Errorf("%s %s is in namespace %q", o.Kind, o.Name, ns)
			}
		}
		return "", nil
	}},
	{"Namespace enforces the restricted Pod Security Standard", func(m *manifests) (string, error) {
		if got := m.ns.Labels["pod-security.kubernetes.io/enforce"]; got != "restricted" {
			return "", fmt.Errorf("label pod-security.kubernetes.io/enforce is %q, want \"restricted\"", got)
		}
		return "", nil
	}},
	{"Deployment runs one replica, rolling with maxUnavailable 0 and maxSurge 1", func(m *manifests) (string, error) {
		s := m.deploy.Spec
		if ptr.Deref(s.Replicas, -1) != 1 {
			return "", fmt.Errorf("replicas is %s, want 1", show(s.Replicas))
		}
		ru := ptr.Deref(s.Strategy.RollingUpdate, appsv1.RollingUpdateDeployment{})
		if s.Strategy.Type != appsv1.RollingUpdateDeploymentStrategyType || !ptr.Equal(ru.MaxUnavailable, ptr.To(intstr.FromInt32(0))) ||
			!ptr.Equal(ru.MaxSurge, ptr.To(intstr.FromInt32(1))) {
			return "", errors.New("strategy must be RollingUpdate with maxUnavailable: 0 and maxSurge: 1, so the single pod is replaced only once its successor is ready")
		}
		return "", nil
	}},
	{"exactly one container, no init or ephemeral containers (no sidecar)", func(m *manifests) (string, error) {
		if n := len(m.pod.Containers); n != 1 {
			return "", fmt.Errorf("%d containers", n)
		}
		if n, e := len(m.pod.InitContainers), len(m.pod.EphemeralContainers); n+e > 0 {
			return "", fmt.Errorf("%d init and %d ephemeral containers", n, e)
		}
		return m.c.Name, nil
	}},
	{"no imagePullSecrets; public image with an explicit tag", func(m *manifests) (string, error) {
		if len(m.pod.ImagePullSecrets) > 0 {
			return "", errors.New("imagePullSecrets is set")
		}
		name, tag, ok := strings.Cut(path.Base(m.c.Image), ":")
		if !strings.HasPrefix(m.c.Image, "ghcr.io/") || !ok || name == "" || tag == "" || tag == "latest" {
			return "", fmt.Errorf("image %q, want ghcr.io/<owner>/<name>:<release tag>", m.c.Image)
		}
		return m.c.Image, nil
	}},
	{"no tailscale container, env, volume or mount: the Deployment never names tailscale", func(m *manifests) (string, error) {
		for _, o := range m.objects {
			if o.Kind == "Deployment" && bytes.Contains(bytes.ToLower(o.doc), []byte("tailscale")) {
				return "", errors.New(`the rendered Deployment contains "tailscale"`)
			}
		}
		return "", nil
	}},
	{"no host namespaces, no command or args override, no env from other objects", func(m *manifests) (string, error) {
		if m.pod.HostNetwork || m.pod.HostPID || m.pod.HostIPC {
			return "", errors.New("hostNetwork, hostPID or hostIPC is set")
		}
		if len(m.c.Command)+len(m.c.Args) > 0 {
			return "", fmt.Errorf("command %q args %q: the image's ENTRYPOINT and CONFIG_PATH must be used", m.c.Command, m.c.Args)
		}
		if i := slices.IndexFunc(m.c.Env, func(e corev1.EnvVar) bool { return e.ValueFrom != nil }); len(m.c.EnvFrom) > 0 || i >= 0 {
			return "", errors.New("envFrom or an env valueFrom is set")
		}
		return "", nil
	}},
	{"the container port is the config's listen port and the image's EXPOSE", func(m *manifests) (string, error) {
		listen := regexp.MustCompile(`(?m)^listen_addr\s*=\s*"[^"]*:(\d+)"`).FindStringSubmatch(m.cm.Data[configKey])
		if listen == nil {
			return "", errors.New(`the ConfigMap's config.toml has no listen_addr = "host:port" line`)
		}
		if p := strconv.Itoa(int(m.port)); m.port < 0 || p != listen[1] || m.port != m.img.port {
			return "", fmt.Errorf("%d container ports %v, config listen_addr port %s, Dockerfile EXPOSE %d", len(m.c.Ports), m.port, listen[1], m.img.port)
		}
		return fmt.Sprintf("%s %d", m.c.Ports[0].Name, m.port), nil
	}},
	{"startup, readiness and liveness probes GET /health on the container port", func(m *manifests) (string, error) {
		for i, p := range []*corev1.Probe{m.c.StartupProbe, m.c.ReadinessProbe, m.c.LivenessProbe} {
			name := []string{"startupProbe", "readinessProbe", "livenessProbe"}[i]
			g := ptr.Deref(p, corev1.Probe{}).HTTPGet
			if g == nil {
				return "", fmt.Errorf("%s has no httpGet", name)
			}
			if g.Path != "/health" || g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP || m.resolve(g.Port) != m.port {
				return "", fmt.Errorf("%s gets %s %s on port %s, want HTTP /health on %d", name, g.Scheme, g.Path, &g.Port, m.port)
			}
		}
		return "", nil
	}},
	{"pod security context: runAsNonRoot, the image's user and group, RuntimeDefault seccomp", func(m *manifests) (string, error) {
		ps := ptr.Deref(m.pod.SecurityContext, corev1.PodSecurityContext{})
		return "", m.podSecurity(corev1.SecurityContext{RunAsNonRoot: ps.RunAsNonRoot, RunAsUser: ps.RunAsUser, RunAsGroup: ps.RunAsGroup, SeccompProfile: ps.SeccompProfile})
	}},
	{"container security context: runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL", func(m *manifests) (string, error) {
		s := m.security
		caps := ptr.Deref(s.Capabilities, corev1.Capabilities{})
		problems := []error{m.podSecurity(s)}
		for _, p := range []struct {
			ok   bool
			what string
		}{
			{ptr.Deref(s.ReadOnlyRootFilesystem, false), "readOnlyRootFilesystem is not true"},
			{!ptr.Deref(s.AllowPrivilegeEscalation, true), "allowPrivilegeEscalation is not false"},
			{!ptr.Deref(s.Privileged, false), "privileged is true"},
			{slices.Equal(caps.Drop, []corev1.Capability{"ALL"}) && len(caps.Add) == 0, "capabilities must drop [ALL] and add none"},
		} {
			if !p.ok {
				problems = append(problems, errors.New(p.what))
			}
		}
		return fmt.Sprintf("uid %d gid %d", m.img.uid, m.img.gid), errors.Join(problems...)
	}},
	{"CPU and memory requests and limits are set, requests within limits", func(m *manifests) (string, error) {
		var parts []string
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			req, hasReq := m.c.Resources.Requests[res]
			limit, hasLimit := m.c.Resources.Limits[res]
			if !hasReq || !hasLimit || req.Cmp(limit) > 0 {
				return "", fmt.Errorf("%s request %s, limit %s: want both set, the request within the limit", res, &req, &limit)
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
		// The Go runtime reads a byte count with an optional B, KiB, MiB, GiB or TiB suffix.
		g := regexp.MustCompile(`^([0-9]+)(|B|KiB|MiB|GiB|TiB)$`).FindStringSubmatch(val)
		if g == nil {
			return "", fmt.Errorf("GOMEMLIMIT %q: want a byte count the Go runtime reads, like 110MiB (Go does not read the container memory limit)", val)
		}
		soft, err := resource.ParseQuantity(g[1] + strings.TrimSuffix(g[2], "B"))
		if err != nil {
			return "", fmt.Errorf("GOMEMLIMIT %q: %v", val, err)
		}
		limit := m.c.Resources.Limits[corev1.ResourceMemory]
		ratio := soft.AsApproximateFloat64() / limit.AsApproximateFloat64()
		if soft.Cmp(limit) >= 0 || ratio < 0.8 {
			return "", fmt.Errorf("GOMEMLIMIT %s = %d B, memory limit %s = %d B", val, soft.Value(), &limit, limit.Value())
		}
		return fmt.Sprintf("%s = %d B is %.0f%% of %s = %d B", val, soft.Value(), 100*ratio, &limit, limit.Value()), nil
	}},
	{fmt.Sprintf("preStop sleep + %d s drain < terminationGracePeriodSeconds", drainSeconds), func(m *manifests) (string, error) {
		lc := ptr.Deref(m.c.Lifecycle, corev1.Lifecycle{})
		if lc.PreStop == nil || lc.PreStop.Sleep == nil {
			return "", errors.New("no lifecycle.preStop.sleep: the pod would be stopped while still listed in the Service endpoints")
		}
		sleep, grace := lc.PreStop.Sleep.Seconds, ptr.Deref(m.pod.TerminationGracePeriodSeconds, 0)
		if sleep <= 0 || sleep+drainSeconds >= grace {
			return "", fmt.Errorf("preStop sleep %d s + drain %d s must be below the grace period %s s", sleep, drainSeconds, show(m.pod.TerminationGracePeriodSeconds))
		}
		return fmt.Sprintf("%d s + %d s < %d s", sleep, drainSeconds, grace), nil
	}},
	{"automountServiceAccountToken is false on the pod and its ServiceAccount", func(m *manifests) (string, error) {
		if m.pod.ServiceAccountName != m.sa.Name {
			return "", fmt.Errorf("pod uses service account %q, the rendered one is %q", m.pod.ServiceAccountName, m.sa.Name)
		}
		if ptr.Deref(m.pod.AutomountServiceAccountToken, true) || ptr.Deref(m.sa.AutomountServiceAccountToken, true) {
			return "", fmt.Errorf("pod %s, ServiceAccount %s, want false for both", show(m.pod.AutomountServiceAccountToken), show(m.sa.AutomountServiceAccountToken))
		}
		return "", nil
	}},
	{"Prometheus annotations scrape /metrics on the container port", func(m *manifests) (string, error) {
		a := m.deploy.Spec.Template.Annotations
		if a["prometheus.io/scrape"] != "true" || a["prometheus.io/path"] != "/metrics" || a["prometheus.io/port"] != strconv.Itoa(int(m.port)) {
			return "", fmt.Errorf("scrape %q path %q port %q", a["prometheus.io/scrape"], a["prometheus.io/path"], a["prometheus.io/port"])
		}
		return "", nil
	}},
	{"the ConfigMap is mounted read-only where the image's CONFIG_PATH points", func(m *manifests) (string, error) {
		for _, v := range m.pod.Volumes {
			if v.ConfigMap == nil || v.ConfigMap.Name != m.cm.Name {
				continue
			}
			file := configKey
			for _, it := range v.ConfigMap.Items {
				if it.Key == configKey {
					file = it.Path
				}
			}
			i := slices.IndexFunc(m.c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == v.Name })
			if i < 0 {
				return "", fmt.Errorf("volume %s is not mounted", v.Name)
			}
			vm := m.c.VolumeMounts[i]
			if file = path.Join(vm.MountPath, file); !vm.ReadOnly || vm.SubPath != "" || file != m.img.configPath {
				return "", fmt.Errorf("%s is mounted with readOnly %v subPath %q, want read-only, no subPath, at CONFIG_PATH=%s", file, vm.ReadOnly, vm.SubPath, m.img.configPath)
			}
			return file, nil
		}
		return "", fmt.Errorf("no volume from ConfigMap %s", m.cm.Name)
	}},
	{"the ConfigMap's config.toml is byte-identical to " + exampleConfig, func(m *manifests) (string, error) {
		want, err := os.ReadFile(filepath.Join(m.repo, exampleConfig))
		if err != nil {
			return "", err
		}
		got, wantLines := strings.SplitAfter(m.cm.Data[configKey], "\n"), strings.SplitAfter(string(want), "\n")
		for i := range max(len(got), len(wantLines)) {
			if g, w := at(got, i), at(wantLines, i); g != w {
				return "", fmt.Errorf("line %d differs: ConfigMap %q, file %q", i+1, g, w)
			}
		}
		return fmt.Sprintf("%d bytes", len(want)), nil
	}},
	{"Service is a ClusterIP with the two Tailscale Operator annotations and nothing more", func(m *manifests) (string, error) {
		s := m.svc.Spec
		if s.Type != corev1.ServiceTypeClusterIP || s.LoadBalancerClass != nil {
			return "", fmt.Errorf("type %q loadBalancerClass %s, want ClusterIP", s.Type, show(s.LoadBalancerClass))
		}
		got := map[string]string{}
		for k, v := range m.svc.Annotations {
			if strings.Contains(k, "tailscale") {
				got[k] = v
			}
		}
		if want := map[string]string{"tailscale.com/expose": "true", "tailscale.com/hostname": tailnetName}; !maps.Equal(got, want) {
			return "", fmt.Errorf("tailscale annotations %v, want %v", got, want)
		}
		return fmt.Sprintf("expose %q, hostname %q", got["tailscale.com/expose"], got["tailscale.com/hostname"]), nil
	}},
	{"the Service hostname is a valid DNS label", func(m *manifests) (string, error) {
		h := m.svc.Annotations["tailscale.com/hostname"]
		if problems := validation.IsDNS1123Label(h); len(problems) > 0 {
			return "", fmt.Errorf("%q: %s", h, strings.Join(problems, "; "))
		}
		return "", nil
	}},
	{"the Service selects the pod and serves the container port on the same port", func(m *manifests) (string, error) {
		s, labels, match := m.svc.Spec, m.deploy.Spec.Template.Labels, ptr.Deref(m.deploy.Spec.Selector, metav1.LabelSelector{}).MatchLabels
		if len(s.Selector) == 0 || !subset(s.Selector, labels) || !subset(match, labels) {
			return "", fmt.Errorf("service selector %v, deployment selector %v, pod labels %v", s.Selector, match, labels)
		}
		if len(s.Ports) != 1 || s.Ports[0].Port != m.port || m.resolve(s.Ports[0].TargetPort) != m.port {
			return "", fmt.Errorf("ports %v, want one port %d targeting the container port", s.Ports, m.port)
		}
		return fmt.Sprintf("tailnet clients use http://%s:%d", tailnetName, s.Ports[0].Port), nil
	}},
}

// decodeStrict decodes a YAML document into v as the API server does with
// strict field validation: a duplicate key, or a field v's type lacks (names
// are case-sensitive), is one of the problems returned, and the rest of the
// document is decoded all the same. (yaml.UnmarshalStrict would accept a
// field whose name differs only in case.)
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

// podSecurity checks the fields a pod's and a container's security context share.
func (m *manifests) podSecurity(s corev1.SecurityContext) error {
	var problems []error
	if !ptr.Deref(s.RunAsNonRoot, false) {
		problems = append(problems, errors.New("runAsNonRoot is not true"))
	}
	if ptr.Deref(s.RunAsUser, -1) != m.img.uid || ptr.Deref(s.RunAsGroup, -1) != m.img.gid {
		problems = append(problems, fmt.Errorf("runAsUser/runAsGroup %s/%s, the image's USER is %d:%d", show(s.RunAsUser), show(s.RunAsGroup), m.img.uid, m.img.gid))
	}
	if ptr.Deref(s.SeccompProfile, corev1.SeccompProfile{}).Type != corev1.SeccompProfileTypeRuntimeDefault {
		problems = append(problems, errors.New("seccompProfile is not RuntimeDefault"))
	}
	return errors.Join(problems...)
}

// resolve returns the number of a port given by number or by the container's port name.
func (m *manifests) resolve(p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	if i := slices.IndexFunc(m.c.Ports, func(c corev1.ContainerPort) bool { return c.Name == p.StrVal }); i >= 0 {
		return m.c.Ports[i].ContainerPort
	}
	return -1
}

// findKey returns the path of the first map key in v for which match is true.
func findKey(v any, at string, match func(string) bool) string {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if match(k) {
				return at + "." + k
			}
			if p := findKey(e, at+"."+k, match); p != "" {
				return p
			}
		}
	case []any:
		for i, e := range v {
			if p := findKey(e, fmt.Sprintf("%s[%d]", at, i), match); p != "" {
				return p
			}
		}
	}
	return ""
}

func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// at returns s[i], or "" past the end.
func at(s []string, i int) string {
	if i < len(s) {
		return s[i]
	}
	return ""
}

// show prints a pointer field's value, or "unset".
func show[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}
