package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

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

// object is one rendered manifest: the fields every kind has, the whole
// document as generic JSON for scans, and its raw JSON for kind-specific decoding.
type object struct {
	Kind     string     `json:"kind"`
	Metadata objectMeta `json:"metadata"`
	generic  any
	raw      []byte
}

type objectMeta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

type deployment struct {
	Spec struct {
		Replicas *int `json:"replicas"`
		Strategy struct {
			Type          string `json:"type"`
			RollingUpdate *struct {
				MaxSurge       *intOrString `json:"maxSurge"`
				MaxUnavailable *intOrString `json:"maxUnavailable"`
			} `json:"rollingUpdate"`
		} `json:"strategy"`
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Template struct {
			Metadata objectMeta `json:"metadata"`
			Spec     podSpec    `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type podSpec struct {
	ServiceAccountName            string            `json:"serviceAccountName"`
	AutomountServiceAccountToken  *bool             `json:"automountServiceAccountToken"`
	TerminationGracePeriodSeconds *int64            `json:"terminationGracePeriodSeconds"`
	SecurityContext               securityContext   `json:"securityContext"`
	Containers                    []container       `json:"containers"`
	InitContainers                []json.RawMessage `json:"initContainers"`
	EphemeralContainers           []json.RawMessage `json:"ephemeralContainers"`
	ImagePullSecrets              []json.RawMessage `json:"imagePullSecrets"`
	HostNetwork                   bool              `json:"hostNetwork"`
	HostPID                       bool              `json:"hostPID"`
	HostIPC                       bool              `json:"hostIPC"`
	Volumes                       []struct {
		Name      string `json:"name"`
		ConfigMap *struct {
			Name  string `json:"name"`
			Items []struct {
				Key  string `json:"key"`
				Path string `json:"path"`
			} `json:"items"`
		} `json:"configMap"`
	} `json:"volumes"`
}

type securityContext struct {
	RunAsNonRoot             *bool  `json:"runAsNonRoot"`
	RunAsUser                *int64 `json:"runAsUser"`
	RunAsGroup               *int64 `json:"runAsGroup"`
	ReadOnlyRootFilesystem   *bool  `json:"readOnlyRootFilesystem"`
	AllowPrivilegeEscalation *bool  `json:"allowPrivilegeEscalation"`
	Privileged               *bool  `json:"privileged"`
	Capabilities             *struct {
		Add  []string `json:"add"`
		Drop []string `json:"drop"`
	} `json:"capabilities"`
	SeccompProfile *struct {
		Type string `json:"type"`
	} `json:"seccompProfile"`
}

type container struct {
	Name    string   `json:"name"`
	Image   string   `json:"image"`
	Command []string `json:"command"`
	Args    []string `json:"args"`
	Ports   []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
	} `json:"ports"`
	Env []struct {
		Name      string          `json:"name"`
		Value     string          `json:"value"`
		ValueFrom json.RawMessage `json:"valueFrom"`
	} `json:"env"`
	EnvFrom   []json.RawMessage `json:"envFrom"`
	Resources struct {
		Requests map[string]string `json:"requests"`
		Limits   map[string]string `json:"limits"`
	} `json:"resources"`
	StartupProbe   *probe `json:"startupProbe"`
	ReadinessProbe *probe `json:"readinessProbe"`
	LivenessProbe  *probe `json:"livenessProbe"`
	Lifecycle      *struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int64 `json:"seconds"`
			} `json:"sleep"`
		} `json:"preStop"`
	} `json:"lifecycle"`
	SecurityContext securityContext `json:"securityContext"`
	VolumeMounts    []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
		ReadOnly  bool   `json:"readOnly"`
		SubPath   string `json:"subPath"`
	} `json:"volumeMounts"`
}

type probe struct {
	HTTPGet *struct {
		Path   string      `json:"path"`
		Port   intOrString `json:"port"`
		Scheme string      `json:"scheme"`
	} `json:"httpGet"`
}

type service struct {
	Spec struct {
		Type              string            `json:"type"`
		LoadBalancerClass string            `json:"loadBalancerClass"`
		Selector          map[string]string `json:"selector"`
		Ports             []struct {
			Name       string      `json:"name"`
			Port       int         `json:"port"`
			TargetPort intOrString `json:"targetPort"`
		} `json:"ports"`
	} `json:"spec"`
}

// intOrString is Kubernetes' port-or-name field.
type intOrString struct {
	s     string
	i     int
	isInt bool
}

func (v *intOrString) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		return json.Unmarshal(b, &v.s)
	}
	v.isInt = true
	return json.Unmarshal(b, &v.i)
}

func (v intOrString) String() string {
	if v.isInt {
		return strconv.Itoa(v.i)
	}
	return strconv.Quote(v.s)
}

// splitDocuments parses kubectl kustomize output: YAML documents separated by "---" lines.
func splitDocuments(data []byte) ([]object, error) {
	var objs []object
	for i, doc := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(data), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		raw, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		var o object
		if err := json.Unmarshal(raw, &o); err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		if err := json.Unmarshal(raw, &o.generic); err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		o.raw = raw
		objs = append(objs, o)
	}
	return objs, nil
}

// imageFacts are what the manifests are cross-checked against in the Dockerfile.
type imageFacts struct {
	uid, gid   int64
	port       int
	configPath string
}

// manifests holds the rendered objects of the kinds the checks look into.
type manifests struct {
	deploy     deployment
	deployRaw  []byte
	svc        service
	svcMeta    objectMeta
	saObj      object
	cmObj      object
	configData string
}

// checkManifests checks the rendered manifests and returns the ConfigMap's
// config.toml, the pod's literal env and the config file path as the pod sees it.
func checkManifests(r *report, repo string, rendered []byte, img imageFacts) (config []byte, podEnv []string, configFile string, err error) {
	objs, err := splitDocuments(rendered)
	if err != nil {
		return nil, nil, "", fmt.Errorf("rendered manifests: %v", err)
	}
	m := &manifests{}
	// Decoded up front so that each check below reads the typed fields.
	for _, o := range objs {
		switch o.Kind {
		case "Deployment":
			err = json.Unmarshal(o.raw, &m.deploy)
			m.deployRaw = o.raw
		case "Service":
			err = json.Unmarshal(o.raw, &m.svc)
			m.svcMeta = o.Metadata
		case "ServiceAccount":
			m.saObj = o
		case "ConfigMap":
			m.cmObj = o
			var cm struct {
				Data map[string]string `json:"data"`
			}
			err = json.Unmarshal(o.raw, &cm)
			m.configData = cm.Data[configKey]
		}
		if err != nil {
			return nil, nil, "", fmt.Errorf("rendered %s %s: %v", o.Kind, o.Metadata.Name, err)
		}
	}
	pod := &m.deploy.Spec.Template.Spec
	var c *container
	if len(pod.Containers) > 0 {
		c = &pod.Containers[0]
	} else {
		c = &container{}
	}

	r.check("k8s/ holds exactly the files SPEC lists", func() (string, error) {
		entries, err := os.ReadDir(filepath.Join(repo, "k8s"))
		if err != nil {
			return "", err
		}
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		want := append(slices.Clone(k8sFiles), "kustomization.yaml")
		slices.Sort(want)
		if !slices.Equal(got, want) {
			return "", fmt.Errorf("got %v, want %v", got, want)
		}
		return strings.Join(got, " "), nil
	})
	r.check("kustomization.yaml lists the five manifests and mentions no secret, even in a comment", func() (string, error) {
		data, err := os.ReadFile(filepath.Join(repo, "k8s", "kustomization.yaml"))
		if err != nil {
			return "", err
		}
		if strings.Contains(strings.ToLower(string(data)), "secret") {
			return "", errors.New(`the file contains the word "secret"`)
		}
		var k struct {
			Namespace string   `json:"namespace"`
			Resources []string `json:"resources"`
		}
		if err := yaml.Unmarshal(data, &k); err != nil {
			return "", err
		}
		if !slices.Equal(k.Resources, k8sFiles) {
			return "", fmt.Errorf("resources are %v, want %v", k.Resources, k8sFiles)
		}
		if k.Namespace != namespaceName {
			return "", fmt.Errorf("namespace is %q, want %q", k.Namespace, namespaceName)
		}
		return "namespace " + k.Namespace, nil
	})
	r.check("kubectl kustomize renders exactly Namespace, ServiceAccount, ConfigMap, Deployment, Service", func() (string, error) {
		var kinds []string
		for _, o := range objs {
			kinds = append(kinds, o.Kind)
		}
		want := []string{"ConfigMap", "Deployment", "Namespace", "Service", "ServiceAccount"}
		slices.Sort(kinds)
		if !slices.Equal(kinds, want) {
			return "", fmt.Errorf("rendered kinds %v, want %v (no Ingress, no Secret, nothing else)", kinds, want)
		}
		return fmt.Sprintf("%d objects", len(objs)), nil
	})
	r.check("no Secret: no object kind or field anywhere names a secret", func() (string, error) {
		for _, o := range objs {
			if strings.Contains(strings.ToLower(o.Kind), "secret") {
				return "", fmt.Errorf("object %s %q", o.Kind, o.Metadata.Name)
			}
			if p := findKey(o.generic, "", func(k string) bool { return strings.Contains(strings.ToLower(k), "secret") }); p != "" {
				return "", fmt.Errorf("%s %s has %s", o.Kind, o.Metadata.Name, p)
			}
		}
		return "", nil
	})
	r.check("every object is in namespace "+namespaceName, func() (string, error) {
		for _, o := range objs {
			ns := o.Metadata.Namespace
			if o.Kind == "Namespace" {
				ns = o.Metadata.Name
			}
			if ns != namespaceName {
				return "", fmt.Errorf("%s %s is in namespace %q", o.Kind, o.Metadata.Name, ns)
			}
		}
		return "", nil
	})
	r.check("Namespace enforces the restricted Pod Security Standard", func() (string, error) {
		var got string
		for _, o := range objs {
			if o.Kind == "Namespace" {
				got = o.Metadata.Labels["pod-security.kubernetes.io/enforce"]
			}
		}
		if got != "restricted" {
			return "", fmt.Errorf("label pod-security.kubernetes.io/enforce is %q, want \"restricted\"", got)
		}
		return "", nil
	})
	r.check("Deployment runs one replica, rolling with maxUnavailable 0 and maxSurge 1", func() (string, error) {
		s := m.deploy.Spec
		if s.Replicas == nil || *s.Replicas != 1 {
			return "", fmt.Errorf("replicas is %v, want 1", deref(s.Replicas))
		}
		ru := s.Strategy.RollingUpdate
		if s.Strategy.Type != "RollingUpdate" || ru == nil || ru.MaxUnavailable == nil || ru.MaxSurge == nil ||
			*ru.MaxUnavailable != (intOrString{isInt: true, i: 0}) || *ru.MaxSurge != (intOrString{isInt: true, i: 1}) {
			return "", errors.New("strategy must be RollingUpdate with maxUnavailable: 0 and maxSurge: 1, so the single pod is replaced only once its successor is ready")
		}
		return "", nil
	})
	r.check("exactly one container, no init or ephemeral containers (no sidecar)", func() (string, error) {
		if n := len(pod.Containers); n != 1 {
			return "", fmt.Errorf("%d containers", n)
		}
		if len(pod.InitContainers)+len(pod.EphemeralContainers) > 0 {
			return "", fmt.Errorf("%d init and %d ephemeral containers", len(pod.InitContainers), len(pod.EphemeralContainers))
		}
		return c.Name, nil
	})
	r.check("no imagePullSecrets; public image with an explicit tag", func() (string, error) {
		if len(pod.ImagePullSecrets) > 0 {
			return "", errors.New("imagePullSecrets is set")
		}
		name, tag, ok := strings.Cut(path.Base(c.Image), ":")
		if !strings.HasPrefix(c.Image, "ghcr.io/") || !ok || name == "" || tag == "" || tag == "latest" {
			return "", fmt.Errorf("image %q, want ghcr.io/<owner>/<name>:<release tag>", c.Image)
		}
		return c.Image, nil
	})
	r.check("no tailscale container, env, volume or mount: the Deployment never names tailscale", func() (string, error) {
		if strings.Contains(strings.ToLower(string(m.deployRaw)), "tailscale") {
			return "", errors.New(`the rendered Deployment contains "tailscale"`)
		}
		return "", nil
	})
	r.check("no host namespaces, no command or args override, no env from other objects", func() (string, error) {
		if pod.HostNetwork || pod.HostPID || pod.HostIPC {
			return "", errors.New("hostNetwork, hostPID or hostIPC is set")
		}
		if len(c.Command)+len(c.Args) > 0 {
			return "", fmt.Errorf("command %q args %q: the image's ENTRYPOINT and CONFIG_PATH must be used", c.Command, c.Args)
		}
		if len(c.EnvFrom) > 0 {
			return "", errors.New("envFrom is set")
		}
		for _, e := range c.Env {
			if e.ValueFrom != nil {
				return "", fmt.Errorf("env %s uses valueFrom", e.Name)
			}
		}
		return "", nil
	})

	containerPort := -1
	portNames := map[string]int{}
	for _, p := range c.Ports {
		portNames[p.Name] = p.ContainerPort
	}
	r.check("the container port is the config's listen port and the image's EXPOSE", func() (string, error) {
		if len(c.Ports) != 1 {
			return "", fmt.Errorf("%d container ports, want 1", len(c.Ports))
		}
		containerPort = c.Ports[0].ContainerPort
		listen, err := listenPort(m.configData)
		if err != nil {
			return "", err
		}
		if containerPort != listen || containerPort != img.port {
			return "", fmt.Errorf("containerPort %d, config listen_addr port %d, Dockerfile EXPOSE %d", containerPort, listen, img.port)
		}
		return fmt.Sprintf("%s %d", c.Ports[0].Name, containerPort), nil
	})
	resolve := func(p intOrString) int {
		if p.isInt {
			return p.i
		}
		if n, ok := portNames[p.s]; ok {
			return n
		}
		return -1
	}
	r.check("startup, readiness and liveness probes GET /health on the container port", func() (string, error) {
		for _, p := range []struct {
			name string
			p    *probe
		}{{"startupProbe", c.StartupProbe}, {"readinessProbe", c.ReadinessProbe}, {"livenessProbe", c.LivenessProbe}} {
			if p.p == nil || p.p.HTTPGet == nil {
				return "", fmt.Errorf("%s has no httpGet", p.name)
			}
			g := p.p.HTTPGet
			if g.Path != "/health" || (g.Scheme != "" && g.Scheme != "HTTP") || resolve(g.Port) != containerPort {
				return "", fmt.Errorf("%s gets %s %s on port %v, want HTTP /health on %d", p.name, g.Scheme, g.Path, g.Port, containerPort)
			}
		}
		return "", nil
	})
	r.check("pod security context: runAsNonRoot, the image's user and group, RuntimeDefault seccomp", func() (string, error) {
		return "", checkSecurityContext(pod.SecurityContext, img, false)
	})
	r.check("container security context: runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL", func() (string, error) {
		// Unset container fields inherit the pod's.
		sc := c.SecurityContext
		ps := pod.SecurityContext
		sc.RunAsUser = cmpOr(sc.RunAsUser, ps.RunAsUser)
		sc.RunAsGroup = cmpOr(sc.RunAsGroup, ps.RunAsGroup)
		sc.RunAsNonRoot = cmpOr(sc.RunAsNonRoot, ps.RunAsNonRoot)
		if sc.SeccompProfile == nil {
			sc.SeccompProfile = ps.SeccompProfile
		}
		return fmt.Sprintf("uid %d gid %d", img.uid, img.gid), checkSecurityContext(sc, img, true)
	})
	r.check("CPU and memory requests and limits are set, requests within limits", func() (string, error) {
		var parts []string
		for _, res := range []string{"cpu", "memory"} {
			req, err1 := parseQuantity(c.Resources.Requests[res])
			lim, err2 := parseQuantity(c.Resources.Limits[res])
			if err := errors.Join(err1, err2); err != nil {
				return "", fmt.Errorf("%s: %v", res, err)
			}
			if req > lim {
				return "", fmt.Errorf("%s request %s exceeds the limit %s", res, c.Resources.Requests[res], c.Resources.Limits[res])
			}
			parts = append(parts, fmt.Sprintf("%s %s/%s", res, c.Resources.Requests[res], c.Resources.Limits[res]))
		}
		return strings.Join(parts, ", "), nil
	})
	r.check("GOMEMLIMIT is below the memory limit, and at least 80% of it", func() (string, error) {
		var val string
		for _, e := range c.Env {
			if e.Name == "GOMEMLIMIT" {
				val = e.Value
			}
		}
		if val == "" {
			return "", errors.New("no GOMEMLIMIT env: Go does not read the container memory limit")
		}
		soft, err := parseGoMemLimit(val)
		if err != nil {
			return "", err
		}
		limit, err := parseQuantity(c.Resources.Limits["memory"])
		if err != nil {
			return "", fmt.Errorf("memory limit: %v", err)
		}
		if float64(soft) >= limit || float64(soft) < 0.8*limit {
			return "", fmt.Errorf("GOMEMLIMIT %s = %d B, memory limit %s = %.0f B", val, soft, c.Resources.Limits["memory"], limit)
		}
		return fmt.Sprintf("%s = %d B is %.0f%% of %s = %.0f B", val, soft, 100*float64(soft)/limit, c.Resources.Limits["memory"], limit), nil
	})
	r.check(fmt.Sprintf("preStop sleep + %d s drain < terminationGracePeriodSeconds", drainSeconds), func() (string, error) {
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
			return "", errors.New("no lifecycle.preStop.sleep: the pod would be stopped while still listed in the Service endpoints")
		}
		sleep := c.Lifecycle.PreStop.Sleep.Seconds
		if pod.TerminationGracePeriodSeconds == nil {
			return "", errors.New("terminationGracePeriodSeconds is not set")
		}
		grace := *pod.TerminationGracePeriodSeconds
		if sleep <= 0 || sleep+drainSeconds >= grace {
			return "", fmt.Errorf("preStop sleep %d s + drain %d s must be below the grace period %d s", sleep, drainSeconds, grace)
		}
		return fmt.Sprintf("%d s + %d s < %d s", sleep, drainSeconds, grace), nil
	})
	r.check("automountServiceAccountToken is false on the pod and its ServiceAccount", func() (string, error) {
		var sa struct {
			Automount *bool `json:"automountServiceAccountToken"`
		}
		if err := json.Unmarshal(m.saObj.raw, &sa); err != nil {
			return "", err
		}
		if pod.ServiceAccountName != m.saObj.Metadata.Name {
			return "", fmt.Errorf("pod uses service account %q, the rendered one is %q", pod.ServiceAccountName, m.saObj.Metadata.Name)
		}
		if !isFalse(pod.AutomountServiceAccountToken) || !isFalse(sa.Automount) {
			return "", fmt.Errorf("pod %v, ServiceAccount %v, want false for both", deref(pod.AutomountServiceAccountToken), deref(sa.Automount))
		}
		return "", nil
	})
	r.check("Prometheus annotations scrape /metrics on the container port", func() (string, error) {
		a := m.deploy.Spec.Template.Metadata.Annotations
		if a["prometheus.io/scrape"] != "true" || a["prometheus.io/path"] != "/metrics" || a["prometheus.io/port"] != strconv.Itoa(containerPort) {
			return "", fmt.Errorf("scrape %q path %q port %q", a["prometheus.io/scrape"], a["prometheus.io/path"], a["prometheus.io/port"])
		}
		return "", nil
	})
	r.check("the ConfigMap is mounted read-only where the image's CONFIG_PATH points", func() (string, error) {
		file, err := configMount(pod, c, m.cmObj.Metadata.Name)
		if err != nil {
			return "", err
		}
		if file != img.configPath {
			return "", fmt.Errorf("the mounted file is %s, the image reads CONFIG_PATH=%s", file, img.configPath)
		}
		configFile = file
		return file, nil
	})
	r.check("the ConfigMap's config.toml is byte-identical to "+exampleConfig, func() (string, error) {
		want, err := os.ReadFile(filepath.Join(repo, exampleConfig))
		if err != nil {
			return "", err
		}
		if err := sameBytes([]byte(m.configData), want); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d bytes", len(want)), nil
	})
	r.check("Service is a ClusterIP with the two Tailscale Operator annotations and nothing more", func() (string, error) {
		s := m.svc.Spec
		if s.Type != "ClusterIP" || s.LoadBalancerClass != "" {
			return "", fmt.Errorf("type %q loadBalancerClass %q, want ClusterIP", s.Type, s.LoadBalancerClass)
		}
		want := map[string]string{"tailscale.com/expose": "true", "tailscale.com/hostname": tailnetName}
		got := map[string]string{}
		for k, v := range m.svcMeta.Annotations {
			if strings.Contains(k, "tailscale") {
				got[k] = v
			}
		}
		if !mapsEqual(got, want) {
			return "", fmt.Errorf("tailscale annotations %v, want %v", got, want)
		}
		return fmt.Sprintf("expose %q, hostname %q", got["tailscale.com/expose"], got["tailscale.com/hostname"]), nil
	})
	r.check("the Service hostname is a valid DNS label", func() (string, error) {
		h := m.svcMeta.Annotations["tailscale.com/hostname"]
		if len(h) > 63 || !regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`).MatchString(h) {
			return "", fmt.Errorf("%q is not a DNS label (RFC 1123: lowercase letters, digits, inner hyphens, at most 63)", h)
		}
		return "", nil
	})
	r.check("the Service selects the pod and serves the container port as port "+strconv.Itoa(containerPort), func() (string, error) {
		s := m.svc.Spec
		labels := m.deploy.Spec.Template.Metadata.Labels
		if len(s.Selector) == 0 || !subset(s.Selector, labels) || !subset(m.deploy.Spec.Selector.MatchLabels, labels) {
			return "", fmt.Errorf("service selector %v, deployment selector %v, pod labels %v", s.Selector, m.deploy.Spec.Selector.MatchLabels, labels)
		}
		if len(s.Ports) != 1 || s.Ports[0].Port != containerPort || resolve(s.Ports[0].TargetPort) != containerPort {
			return "", fmt.Errorf("ports %+v, want one port %d targeting the container port", s.Ports, containerPort)
		}
		return fmt.Sprintf("tailnet clients use http://%s:%d", tailnetName, s.Ports[0].Port), nil
	})

	for _, e := range c.Env {
		podEnv = append(podEnv, e.Name+"="+e.Value)
	}
	return []byte(m.configData), podEnv, configFile, nil
}

// checkSecurityContext checks one security context; container adds the
// fields only a container has.
func checkSecurityContext(sc securityContext, img imageFacts, container bool) error {
	var problems []string
	if !isTrue(sc.RunAsNonRoot) {
		problems = append(problems, "runAsNonRoot is not true")
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != img.uid || sc.RunAsGroup == nil || *sc.RunAsGroup != img.gid {
		problems = append(problems, fmt.Sprintf("runAsUser/runAsGroup %v/%v, the image's USER is %d:%d", deref(sc.RunAsUser), deref(sc.RunAsGroup), img.uid, img.gid))
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != "RuntimeDefault" {
		problems = append(problems, "seccompProfile is not RuntimeDefault")
	}
	if container {
		if !isTrue(sc.ReadOnlyRootFilesystem) {
			problems = append(problems, "readOnlyRootFilesystem is not true")
		}
		if !isFalse(sc.AllowPrivilegeEscalation) {
			problems = append(problems, "allowPrivilegeEscalation is not false")
		}
		if isTrue(sc.Privileged) {
			problems = append(problems, "privileged is true")
		}
		if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) || len(sc.Capabilities.Add) > 0 {
			problems = append(problems, "capabilities must drop [ALL] and add none")
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// configMount returns the path at which the container sees the ConfigMap's
// config.toml, requiring a read-only mount of the whole volume.
func configMount(pod *podSpec, c *container, configMap string) (string, error) {
	for _, v := range pod.Volumes {
		if v.ConfigMap == nil || v.ConfigMap.Name != configMap {
			continue
		}
		file := configKey
		for _, it := range v.ConfigMap.Items {
			if it.Key == configKey {
				file = it.Path
			}
		}
		for _, vm := range c.VolumeMounts {
			if vm.Name != v.Name {
				continue
			}
			if !vm.ReadOnly || vm.SubPath != "" {
				return "", fmt.Errorf("volume %s is mounted at %s with readOnly %v subPath %q, want read-only, no subPath", v.Name, vm.MountPath, vm.ReadOnly, vm.SubPath)
			}
			return path.Join(vm.MountPath, file), nil
		}
		return "", fmt.Errorf("volume %s is not mounted", v.Name)
	}
	return "", fmt.Errorf("no volume from ConfigMap %s", configMap)
}

// listenPort returns the port of listen_addr in the config file.
func listenPort(config string) (int, error) {
	m := regexp.MustCompile(`(?m)^listen_addr\s*=\s*"[^"]*:(\d+)"`).FindStringSubmatch(config)
	if m == nil {
		return 0, errors.New(`the ConfigMap's config.toml has no listen_addr = "host:port" line`)
	}
	return strconv.Atoi(m[1])
}

// sameBytes reports the first line where got and want differ.
func sameBytes(got, want []byte) error {
	if bytes.Equal(got, want) {
		return nil
	}
	g, w := strings.SplitAfter(string(got), "\n"), strings.SplitAfter(string(want), "\n")
	for i := 0; i < max(len(g), len(w)); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Errorf("%d bytes vs %d; line %d differs: ConfigMap %q, file %q", len(got), len(want), i+1, gl, wl)
		}
	}
	return fmt.Errorf("%d bytes vs %d", len(got), len(want))
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

func mapsEqual(a, b map[string]string) bool { return len(a) == len(b) && subset(a, b) }

func isTrue(b *bool) bool  { return b != nil && *b }
func isFalse(b *bool) bool { return b != nil && !*b }

func cmpOr[T any](a, b *T) *T {
	if a != nil {
		return a
	}
	return b
}

// deref prints a pointer field's value, or "unset".
func deref[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}
