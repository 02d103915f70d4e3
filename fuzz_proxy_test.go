package main

import (
	"bufio"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// captureTransport records the request ReverseProxy would send upstream and
// answers 200 with an empty body in place of the upstream.
type captureTransport struct{ out *http.Request }

func (c *captureTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	c.out = req
	return &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Body: http.NoBody, Request: req}, nil
}

// rewriteRules are the injected headers FuzzRewrite checks, one per mode.
var rewriteRules = []HeaderRule{
	{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
	{Name: "x-injected", Value: "v1", Mode: HeaderSet},
	{Name: "x-api-key", Mode: HeaderRemove},
}

// FuzzRewrite sends a request built from fuzzed parts — request target,
// Connection, anthropic-beta, Authorization and one more header — through
// net/http's request parser and the real handler (stripHopByHop,
// ReverseProxy, rewrite), to a transport that records the upstream request
// instead of sending it. Upstream URLs with and without a base path are
// both checked.
func FuzzRewrite(f *testing.F) {
	seeds := [][6]string{
		// target, Connection, anthropic-beta, Authorization, extra name, extra value
		{"/v1/messages?beta=true", "", "", "Bearer sk-ant-oat01-x", "X-Multi", "a"},
		{"//evil.example/x", "Authorization, Anthropic-Beta, X-Injected, X-Api-Key", "a,b", "Bearer t", "X-Api-Key", "sk-stray"},
		{"http://evil.example/steal?x=1", "keep-alive, X-Hop", "OAUTH-2025-04-20", "", "X-Hop", "1"},
		{"http://user:pass@evil.example:8443/x", "", "", "", "", ""},
		{"https://evil.example", "", "", "", "", ""},
		{"/v1/x?a=1;b=2&c=%zz", "", ", ,", "", "X-Forwarded-For", "10.0.0.1"},
		{"/v1/files/a%2Fb/content", "Te, Trailer", "oauth-2025-04-20,oauth-2025-04-20", "", "Te", "trailers"},
		{"*", "Upgrade", "", "", "Upgrade", "websocket"},
		{"/v1/x?", "", "", "", "Forwarded", "for=10.0.0.1"},
		{"/%2e%2e/x", "close", "", "", "Proxy-Authorization", "Basic eA=="},
		{"/a/../b", "", "", "", "Expect", "100-continue"},
		{"/v1/x", "", "", "", "Transfer-Encoding", "chunked"},
		{"/v1/x", "X-Forwarded-Host", "", "", "X-Forwarded-Host", "evil"},
		{"/v1/x", "Proxy-Connection", "", "", "Proxy-Connection", "keep-alive"},
		{"/v1/x", "", "", "", "Keep-Alive", "timeout=5"},
		{"/v1/%7Euser/x?q=%20+&empty=&=v", "", "", "", "Via", "1.1 client-proxy"},
		{"/v1/odd/!$&'()*+,;=:@", "", "", "", "Proxy-Authenticate", "Basic"},
		{"/v1/x?q=1#frag", "", "", "", "", ""},
		{"http:foo", "", "", "", "", ""},
		{"https:evil.example:8443/x?y=1", "", "", "", "", ""},
		{"/v1/x", "anthropic-beta", "a", "", "Anthropic-Beta", "b"},
		{"/v1/x", "", "a", "", "Anthropic-Beta", "oauth-2025-04-20"},
		{"/v1/x", "", "\t", "", "Anthropic-Beta", ","},
		{"/v1/x", "authorization, x-injected", "", "Bearer t", "Authorization", "Bearer second"},
		{"/v1/x", "", "", "", "X-Injected", "client"},
		{"/v1/x", "", "", "", "Content-Length", "0"},
	}
	for _, s := range seeds {
		f.Add(s[0], s[1], s[2], s[3], s[4], s[5])
	}
	type target struct {
		upstream *url.URL
		srv      *server
		tr       *captureTransport
	}
	var targets []target
	for _, raw := range []string{"https://api.anthropic.com", "http://127.0.0.1:9/base"} {
		cfg := testConfig(f, raw)
		cfg.Timeout = time.Minute
		cfg.Headers = rewriteRules
		s := newServer(cfg, slog.New(slog.DiscardHandler), testTuning)
		tr := &captureTransport{}
		s.proxy.Transport = tr
		targets = append(targets, target{cfg.Upstream, s, tr})
	}
	f.Fuzz(func(t *testing.T, reqTarget, connection, beta, auth, name, value string) {
		var b strings.Builder
		b.WriteString("POST " + reqTarget + " HTTP/1.1\r\nHost: proxy.local\r\n")
		for _, h := range [][2]string{{"Connection", connection}, {"Anthropic-Beta", beta}, {"Authorization", auth}, {name, value}} {
			if h[0] != "" && h[1] != "" {
				b.WriteString(h[0] + ": " + h[1] + "\r\n")
			}
		}
		b.WriteString("\r\n")
		raw := b.String()
		for _, tg := range targets {
			in, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
			if err != nil {
				return // net/http's server would answer 400 itself
			}
			sent := in.Header.Clone()
			sentURL := *in.URL
			tg.tr.out = nil
			rec := httptest.NewRecorder()
			tg.srv.ServeHTTP(rec, in)
			out := tg.tr.out
			if sentURL.Opaque != "" {
				// A target without a path ("http:foo") is refused.
				if out != nil || rec.Code != http.StatusBadRequest {
					t.Fatalf("%q: target without a path answered %d, sent upstream: %v; want 400, not sent", raw, rec.Code, out != nil)
				}
				continue
			}
			if out == nil {
				// Only a request whose body cannot be read is not sent.
				if rec.Code != http.StatusBadRequest && rec.Body.Len() != 0 {
					t.Fatalf("%q: not sent upstream, yet answered %d %q", raw, rec.Code, rec.Body)
				}
				continue
			}
			checkUpstreamRequest(t, raw, reqTarget, tg.upstream, &sentURL, sent, out)
		}
	})
}

// targetPath returns the path of a request target as written: "/*" for
// "*", the path of an absolute URL, "/" if it has none.
func targetPath(target string) string {
	target, _, _ = strings.Cut(target, "?")
	if strings.HasPrefix(target, "/") {
		return target
	}
	if target == "*" {
		return "/*"
	}
	if _, rest, ok := strings.Cut(target, "://"); ok && strings.Contains(rest, "/") {
		return rest[strings.Index(rest, "/"):]
	}
	return "/"
}

// checkUpstreamRequest checks the properties of out, the upstream request
// made from a client request with URL in and header sent.
func checkUpstreamRequest(t *testing.T, raw, target string, upstream, in *url.URL, sent http.Header, out *http.Request) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Errorf("%q (upstream %s): "+format, append([]any{raw, upstream}, args...)...)
	}
	// Scheme and host are the upstream's, whatever the request target.
	if out.URL.Scheme != upstream.Scheme || out.URL.Host != upstream.Host || (out.Host != "" && out.Host != upstream.Host) {
		fail("upstream request to %s://%s (Host %q); want %s://%s", out.URL.Scheme, out.URL.Host, out.Host, upstream.Scheme, upstream.Host)
	}
	// The path is the client's, byte for byte as sent, under the
	// upstream's base path; the query is the client's raw query. A path
	// starting "//" is the one exception: it cannot be sent verbatim
	// without naming a host, and goes as url.URL escapes it.
	wantPath := strings.TrimSuffix(upstream.EscapedPath(), "/") + targetPath(target)
	if strings.HasPrefix(wantPath, "//") {
		if out.URL.Opaque != "" || out.URL.Path != strings.TrimSuffix(upstream.Path, "/")+in.Path {
			fail("path %q (opaque %q); want %q", out.URL.Path, out.URL.Opaque, upstream.Path+in.Path)
		}
	} else if got, _, _ := strings.Cut(out.URL.RequestURI(), "?"); got != wantPath {
		fail("request target path %q; want %q as sent", got, wantPath)
	}
	if out.URL.RawQuery != in.RawQuery || out.URL.ForceQuery != in.ForceQuery {
		fail("query %q (force %v); want %q (force %v)", out.URL.RawQuery, out.URL.ForceQuery, in.RawQuery, in.ForceQuery)
	}

	// The headers named in Connection, hop-by-hop or not.
	named := map[string]bool{}
	for _, v := range sent["Connection"] {
		for tok := range strings.SplitSeq(v, ",") {
			if tok = strings.Trim(tok, " \t"); tok != "" {
				named[http.CanonicalHeaderKey(tok)] = true
			}
		}
	}
	injected := map[string]bool{}
	for _, r := range rewriteRules {
		if r.Mode != HeaderRemove {
			injected[http.CanonicalHeaderKey(r.Name)] = true
		}
	}

	// Authorization passes untouched, even when named in Connection.
	if diff := cmp.Diff(sent["Authorization"], out.Header["Authorization"]); diff != "" {
		fail("Authorization changed (-sent +upstream):\n%s", diff)
	}
	// Injected headers: set is exactly the value; append keeps the client's
	// lines in order as one line and adds the token only if missing; remove
	// leaves nothing.
	if got := out.Header["X-Injected"]; !slices.Equal(got, []string{"v1"}) {
		fail("X-Injected = %q; want exactly [v1]", got)
	}
	if got, ok := out.Header["X-Api-Key"]; ok {
		fail("X-Api-Key = %q; want it removed", got)
	}
	var client []string
	if !named["Anthropic-Beta"] {
		for _, v := range sent["Anthropic-Beta"] {
			if strings.Trim(v, " \t,") != "" {
				client = append(client, v)
			}
		}
	}
	clientLine := strings.Join(client, ",")
	want := max(1, countToken(clientLine, "oauth-2025-04-20"))
	got := out.Header["Anthropic-Beta"]
	if len(got) != 1 || !strings.HasPrefix(got[0], clientLine) || countToken(got[0], "oauth-2025-04-20") != want {
		fail("Anthropic-Beta = %q from client %q; want one line, the client's first, with the token %d time(s)", got, sent["Anthropic-Beta"], want)
	}
	// No hop-by-hop header, nothing named in Connection (Authorization and
	// injected headers aside), no Expect, no forwarding headers, no Via of
	// the proxy's own.
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade", "Expect", "Forwarded"} {
		if v, ok := out.Header[k]; ok {
			fail("upstream request has %s: %q", k, v)
		}
	}
	for k := range named {
		if _, ok := out.Header[k]; ok && k != "Authorization" && !injected[k] {
			fail("upstream request has %s, which the client named in Connection", k)
		}
	}
	for k := range out.Header {
		if strings.HasPrefix(strings.ToLower(k), "x-forwarded-") {
			fail("upstream request has %s", k)
		}
	}
	if _, ok := sent["Via"]; !ok && out.Header["Via"] != nil {
		fail("the proxy added Via: %q", out.Header["Via"])
	}
	if out.Body != nil && out.Body != http.NoBody {
		if b, _ := io.ReadAll(out.Body); len(b) != 0 {
			fail("upstream request has a body %q; the client sent none", b)
		}
	}
}

// countToken counts the elements of a comma-separated list equal to token,
// ignoring case and the spaces around them.
func countToken(list, token string) int {
	n := 0
	for t := range strings.SplitSeq(list, ",") {
		if strings.EqualFold(strings.Trim(t, " \t"), token) {
			n++
		}
	}
	return n
}
