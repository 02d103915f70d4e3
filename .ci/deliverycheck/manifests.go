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
// decoded into their Kubernetes types.
type manifests struct {
	repo    string
	img     *image
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

// loadManifests splits kubectl kustomize output into objects and decodes
// the kinds the checks read.
func loadManifests(repo string, rendered []byte, img *image) (*manifests, error) {
	m := &manifests{repo: repo, img: img, c: &corev1.Container{}, port: -1}
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
			got = append(got, e.Name())
		}
		want := append(slices.Clone(k8sFiles), "kustomization.yaml")
		if slices.Sort(want); err != nil || !slices.Equal(got, want) {
			return "", fmt.Errorf("got %v (%v), want %v", got, err, want)
		}
		return strings.Join(got, " "), nil
	}},
	{"kustomization.yaml lists the five manifests and mentions no secret, even in a comment", func(m *manifests) (string, error) {
		data, err := os.ReadFile(filepath.Join(m.repo, "k8s", "kustomization.yaml"))
		var k struct {
			Namespace string
			Resources []string
		}
		if err == nil {
			err = yaml.Unmarshal(data, &k)
		}
		if err != nil || bytes.Contains(bytes.ToLower(data), []byte("secret")) || !slices.Equal(k.Resources, k8sFiles) || k.Namespace != namespaceName {
			return "", fmt.Errorf("namespace %q, resources %v (%v), want %q, %v and no word \"secret\"", k.Namespace, k.Resources, err, namespaceName, k8sFiles)
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
		if len(m.strict) > 0 {
			return "", errors.New(strings.Join(m.strict, "; "))
		}
		return "", nil
	}},
	{"no Secret: no object kind or field anywhere names a secret", func(m *manifests) (string, error) {
		for _, o := range m.objects {
			var tree any
			err := yaml.Unmarshal(o.doc, &tree)
			if key := secretKey(tree, ""); err != nil || key != "" || strings.Contains(strings.ToLower(o.Kind), "secret") {
				return "", fmt.Errorf("%s %s has %s (%v)", o.Kind, o.Name, key, err)
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
		ru := ptr.Deref(s.Strategy.RollingUpdate, appsv1.RollingUpdateDeployment{})
		if ptr.Deref(s.Replicas, -1) != 1 || s.Strategy.Type != appsv1.RollingUpdateDeploymentStrategyType ||
			!ptr.Equal(ru.MaxUnavailable, ptr.To(intstr.FromInt32(0))) || !ptr.Equal(ru.MaxSurge, ptr.To(intstr.FromInt32(1))) {
			return "", fmt.Errorf("replicas %s, strategy %s with maxUnavailable %s, maxSurge %s: want 1 replica, replaced only once its successor is ready",
				show(s.Replicas), s.Strategy.Type, show(ru.MaxUnavailable), show(ru.MaxSurge))
		}
		return "", nil
	}},
	{"exactly one container, no init or ephemeral containers (no sidecar)", func(m *manifests) (string, error) {
		if n, i, e := len(m.pod.Containers), len(m.pod.InitContainers), len(m.pod.EphemeralContainers); n != 1 || i+e > 0 {
			return "", fmt.Errorf("%d containers, %d init and %d ephemeral containers", n, i, e)
		}
		return m.c.Name, nil
	}},
	{"no imagePullSecrets; public image with an explicit tag", func(m *manifests) (string, error) {
		name, tag, _ := strings.Cut(path.Base(m.c.Image), ":")
		if len(m.pod.ImagePullSecrets) > 0 || !strings.HasPrefix(m.c.Image, "ghcr.io/") || name == "" || tag == "" || tag == "latest" {
			return "", fmt.Errorf("image %q with %d imagePullSecrets, want ghcr.io/<owner>/<name>:<release tag> and none", m.c.Image, len(m.pod.ImagePullSecrets))
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
		valueFrom := slices.ContainsFunc(m.c.Env, func(e corev1.EnvVar) bool { return e.ValueFrom != nil })
		if m.pod.HostNetwork || m.pod.HostPID || m.pod.HostIPC || len(m.c.Command)+len(m.c.Args)+len(m.c.EnvFrom) > 0 || valueFrom {
			return "", fmt.Errorf("host network, PID, IPC %v %v %v; command %q args %q (the image's ENTRYPOINT and CONFIG_PATH must be used); %d envFrom; env valueFrom %v",
				m.pod.HostNetwork, m.pod.HostPID, m.pod.HostIPC, m.c.Command, m.c.Args, len(m.c.EnvFrom), valueFrom)
		}
		return "", nil
	}},
	{"the container port is the config's listen port and the image's EXPOSE", func(m *manifests) (string, error) {
		listen := "none"
		if l := listenPort.FindStringSubmatch(m.cm.Data[configKey]); l != nil {
			listen = l[1]
		}
		if m.port < 0 || listen != strconv.Itoa(int(m.port)) || m.port != m.img.port {
			return "", fmt.Errorf("container ports %v, config.toml listen_addr port %s, Dockerfile EXPOSE %d: want one port, the same", m.c.Ports, listen, m.img.port)
		}
		return fmt.Sprintf("%s %d", m.c.Ports[0].Name, m.port), nil
	}},
	{"startup, readiness and liveness probes GET /health on the container port", func(m *manifests) (string, error) {
		for i, p := range []*corev1.Probe{m.c.StartupProbe, m.c.ReadinessProbe, m.c.LivenessProbe} {
			g := ptr.Deref(ptr.Deref(p, corev1.Probe{}).HTTPGet, corev1.HTTPGetAction{})
			if g.Path != "/health" || g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP || m.resolve(g.Port) != m.port {
				return "", fmt.Errorf("%s gets %q %q on port %s, want an httpGet of /health on %d", []string{"startup", "readiness", "liveness"}[i], g.Scheme, g.Path, &g.Port, m.port)
			}
		}
		return "", nil
	}},
	{"pod security context: runAsNonRoot, the image's user and group, RuntimeDefault seccomp", func(m *manifests) (string, error) {
		ps := ptr.Deref(m.pod.SecurityContext, corev1.PodSecurityContext{})
		return "", m.runsAsImage(corev1.SecurityContext{RunAsNonRoot: ps.RunAsNonRoot, RunAsUser: ps.RunAsUser, RunAsGroup: ps.RunAsGroup, SeccompProfile: ps.SeccompProfile})
	}},
	{"container security context: runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL", func(m *manifests) (string, error) {
		// Fields the container leaves unset are the pod's.
		ps := ptr.Deref(m.pod.SecurityContext, corev1.PodSecurityContext{})
		s := ptr.Deref(m.c.SecurityContext, corev1.SecurityContext{})
		s.RunAsNonRoot, s.RunAsUser = cmp.Or(s.RunAsNonRoot, ps.RunAsNonRoot), cmp.Or(s.RunAsUser, ps.RunAsUser)
		s.RunAsGroup, s.SeccompProfile = cmp.Or(s.RunAsGroup, ps.RunAsGroup), cmp.Or(s.SeccompProfile, ps.SeccompProfile)
		caps, err := ptr.Deref(s.Capabilities, corev1.Capabilities{}), m.runsAsImage(s)
		if !ptr.Deref(s.ReadOnlyRootFilesystem, false) || ptr.Deref(s.AllowPrivilegeEscalation, true) || ptr.Deref(s.Privileged, false) ||
			!slices.Equal(caps.Drop, []corev1.Capability{"ALL"}) || len(caps.Add) > 0 {
			err = errors.Join(err, fmt.Errorf("readOnlyRootFilesystem %s, allowPrivilegeEscalation %s, privileged %s, capabilities %+v: want true, false, false, drop [ALL] add none",
				show(s.ReadOnlyRootFilesystem), show(s.AllowPrivilegeEscalation), show(s.Privileged), caps))
		}
		return fmt.Sprintf("uid %d gid %d", m.img.uid, m.img.gid), err
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
		var soft resource.Quantity
		for _, e := range m.c.Env {
			if e.Name == "GOMEMLIMIT" {
				val = e.Value
			}
		}
		if g := goMemLimit.FindStringSubmatch(val); g != nil {
			soft, _ = resource.ParseQuantity(g[1] + strings.TrimSuffix(g[2], "B")) // 110MiB is 110Mi
		}
		limit := m.c.Resources.Limits[corev1.ResourceMemory]
		ratio := soft.AsApproximateFloat64() / limit.AsApproximateFloat64()
		if soft.Cmp(limit) >= 0 || ratio < 0.8 {
			return "", fmt.Errorf("GOMEMLIMIT %q = %d B, memory limit %s = %d B: want a byte count the Go runtime reads, like 110MiB (Go does not read the container's limit)", val, soft.Value(), &limit, limit.Value())
		}
		return fmt.Sprintf("%s = %d B is %.0f%% of %s = %d B", val, soft.Value(), 100*ratio, &limit, limit.Value()), nil
	}},
	{fmt.Sprintf("preStop sleep + %d s drain < terminationGracePeriodSeconds", drainSeconds), func(m *manifests) (string, error) {
		preStop := ptr.Deref(ptr.Deref(m.c.Lifecycle, corev1.Lifecycle{}).PreStop, corev1.LifecycleHandler{})
		sleep, grace := ptr.Deref(preStop.Sleep, corev1.SleepAction{}).Seconds, ptr.Deref(m.pod.TerminationGracePeriodSeconds, 0)
		if sleep <= 0 || sleep+drainSeconds >= grace {
			return "", fmt.Errorf("lifecycle.preStop.sleep %d s + drain %d s, grace period %d s: want a sleep, so that the pod leaves the Service endpoints before SIGTERM, and the sum below the grace period", sleep, drainSeconds, grace)
		}
		return fmt.Sprintf("%d s + %d s < %d s", sleep, drainSeconds, grace), nil
	}},
	{"automountServiceAccountToken is false on the pod and its ServiceAccount", func(m *manifests) (string, error) {
		if m.pod.ServiceAccountName != m.sa.Name || ptr.Deref(m.pod.AutomountServiceAccountToken, true) || ptr.Deref(m.sa.AutomountServiceAccountToken, true) {
			return "", fmt.Errorf("pod's service account %q %s, rendered ServiceAccount %q %s: want the same, false for both",
				m.pod.ServiceAccountName, show(m.pod.AutomountServiceAccountToken), m.sa.Name, show(m.sa.AutomountServiceAccountToken))
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
				continue
			}
			vm := m.c.VolumeMounts[i]
			if file = path.Join(vm.MountPath, file); !vm.ReadOnly || vm.SubPath != "" || file != m.img.configPath {
				return "", fmt.Errorf("%s is mounted with readOnly %v subPath %q, want read-only, no subPath, at CONFIG_PATH=%s", file, vm.ReadOnly, vm.SubPath, m.img.configPath)
			}
			return file, nil
		}
		return "", fmt.Errorf("no mounted volume from ConfigMap %s", m.cm.Name)
	}},
	{"the ConfigMap's config.toml is byte-identical to " + exampleConfig, func(m *manifests) (string, error) {
		data, err := os.ReadFile(filepath.Join(m.repo, exampleConfig))
		got, want := m.cm.Data[configKey], string(data)
		if err != nil || got != want {
			n := 0
			for n < min(len(got), len(want)) && got[n] == want[n] {
				n++
			}
			return "", fmt.Errorf("from line %d on, the ConfigMap has %q, the file %q (%v)", strings.Count(got[:n], "\n")+1, got[n:min(n+40, len(got))], want[n:min(n+40, len(want))], err)
		}
		return fmt.Sprintf("%d bytes", len(want)), nil
	}},
	{"Service is a ClusterIP with the two Tailscale Operator annotations and nothing more", func(m *manifests) (string, error) {
		tailscale := maps.Clone(m.svc.Annotations)
		maps.DeleteFunc(tailscale, func(k, _ string) bool { return !strings.Contains(k, "tailscale") })
		want := map[string]string{"tailscale.com/expose": "true", "tailscale.com/hostname": tailnetName}
		if s := m.svc.Spec; s.Type != corev1.ServiceTypeClusterIP || s.LoadBalancerClass != nil || !maps.Equal(tailscale, want) {
			return "", fmt.Errorf("type %q, loadBalancerClass %s, tailscale annotations %v: want ClusterIP, none, %v", s.Type, show(s.LoadBalancerClass), tailscale, want)
		}
		return fmt.Sprintf("expose %q, hostname %q", want["tailscale.com/expose"], want["tailscale.com/hostname"]), nil
	}},
	{"the Service hostname is a valid DNS label", func(m *manifests) (string, error) {
		h := m.svc.Annotations["tailscale.com/hostname"]
		if problems := validation.IsDNS1123Label(h); len(problems) > 0 {
			return "", fmt.Errorf("%q: %s", h, strings.Join(problems, "; "))
		}
		return "", nil
	}},
	{"the Service selects the pod and serves the container port on the same port", func(m *manifests) (string, error) {
		s, pod := m.svc.Spec, labels.Set(m.deploy.Spec.Template.Labels)
		deploy, err := metav1.LabelSelectorAsSelector(m.deploy.Spec.Selector)
		if len(s.Selector) == 0 || !labels.SelectorFromSet(s.Selector).Matches(pod) || err != nil || !deploy.Matches(pod) {
			return "", fmt.Errorf("service selector %v, deployment selector %v (%v), pod labels %v", s.Selector, deploy, err, pod)
		}
		if len(s.Ports) != 1 || s.Ports[0].Port != m.port || m.resolve(s.Ports[0].TargetPort) != m.port {
			return "", fmt.Errorf("ports %v, want one port %d targeting the container port", s.Ports, m.port)
		}
		return fmt.Sprintf("tailnet clients use http://%s:%d", tailnetName, s.Ports[0].Port), nil
	}},
}

// runsAsImage checks the fields a pod's and a container's security context share.
func (m *manifests) runsAsImage(s corev1.SecurityContext) error {
	if !ptr.Deref(s.RunAsNonRoot, false) || ptr.Deref(s.RunAsUser, -1) != m.img.uid || ptr.Deref(s.RunAsGroup, -1) != m.img.gid ||
		ptr.Deref(s.SeccompProfile, corev1.SeccompProfile{}).Type != corev1.SeccompProfileTypeRuntimeDefault {
		return fmt.Errorf("runAsNonRoot %s, runAsUser:runAsGroup %s:%s, seccompProfile %s: want true, the image's USER %d:%d, RuntimeDefault",
			show(s.RunAsNonRoot), show(s.RunAsUser), show(s.RunAsGroup), show(s.SeccompProfile), m.img.uid, m.img.gid)
	}
	return nil
}

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

// show prints a pointer field's value, or "unset".
func show[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	if s, ok := any(p).(fmt.Stringer); ok {
		return s.String()
	}
	return fmt.Sprint(*p)
}
