package peers

import (
	"net/url"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParseBaseURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "": refused
	}{
		{"http://10.0.0.1:5050", "http://10.0.0.1:5050"},
		{"https://node-a.example", "https://node-a.example"},
		{"http://node-a.example:5050/", "http://node-a.example:5050"},
		{"http://h//", "http://h"},
		{"HTTP://h", "http://h"},
		{"http://h/prefix/", ""},
		{"http://h/a b", ""},
		{"http://h/a%2Fb", ""},
		{"http://h/..", ""},
		{"http://[::1]:5050", "http://[::1]:5050"},
		{"http://h:65535", "http://h:65535"},

		{"", ""},
		{"h", ""},
		{"h:5050", ""},
		{"10.0.0.1:5050", ""},
		{"//h:5050", ""},
		{"/coop", ""},
		{"ftp://h", ""},
		{"unix:///run/coop.sock", ""},
		{"http:h", ""},
		{"http://", ""},
		{"http:///path", ""},
		{"http://:5050", ""},
		{"http://h:", ""},
		{"http://h:0", ""},
		{"http://h:65536", ""},
		{"http://h:port", ""},
		{"http://user:secret@h", ""},
		{"http://@h", ""},
		{"http://h?x=1", ""},
		{"http://h?", ""},
		{"http://h/?", ""},
		{"http://h#", ""},
		{"http://h/#frag", ""},
		{"http://a b", ""},
		{"http://h/\n", ""},
		{" http://h", ""},
		{"http://h/%zz", ""},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseBaseURL(tc.in)
			if tc.want == "" {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("ParseBaseURL(%q) = %q, %v; want invalid argument", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseBaseURL(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
			}
		})
	}
}

// FuzzParseBaseURL checks ParseBaseURL's invariants: it never panics, it
// refuses with ErrInvalidArgument, and what it accepts is a fixed point, an
// http(s) URL of the same host and nothing else, to which a path appends
// as exactly that path.
func FuzzParseBaseURL(f *testing.F) {
	for _, seed := range []string{
		"http://10.0.0.1:5050", "https://h/", "HTTP://h//", "http://h/a b", "http://[::1]:5050",
		"http://[fe80::1%25en0]:5050", "http://h?", "http://h#", "http://u@h", "http://h:0", "h:5050",
		"http://h/a%2F", "http://%41", "ftp://h",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseBaseURL(s)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q: error %v is not invalid argument", s, err)
			}
			return
		}
		if again, err := ParseBaseURL(got); err != nil || again != got {
			t.Fatalf("%q gave %q, which gives %q, %v", s, got, again, err)
		}
		if strings.HasSuffix(got, "/") || strings.ContainsAny(got, "?#") {
			t.Fatalf("%q gave %q", s, got)
		}
		in, _ := url.Parse(s)
		u, err := url.Parse(got + "/v2/x/blobs/y")
		if err != nil {
			t.Fatalf("%q gave %q, to which a path does not append: %v", s, got, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host != in.Host || u.User != nil || u.RawQuery != "" || u.Fragment != "" ||
			u.Path != "/v2/x/blobs/y" {
			t.Fatalf("%q gave %q, which with a path is %#v", s, got, u)
		}
	})
}

func TestJoinURL(t *testing.T) {
	d := "sha256:" + strings.Repeat("a", 64)
	for _, tc := range []struct {
		base string
		elem []string
		want string // "" when refused
	}{
		{"http://a:1", []string{"/v2/coop/blobs", d}, "http://a:1/v2/coop/blobs/" + d},
		{"HTTPS://a:1/", []string{HavePath}, "https://a:1" + HavePath},
		{"http://a:1", []string{ContainersPath, "ns", url.PathEscape("x/../../stop")}, "http://a:1" + ContainersPath + "/ns/x%2F..%2F..%2Fstop"},
		{"http://a:1#", []string{HavePath}, ""},
		{"http://a:1/x", []string{HavePath}, ""},
		{"http://u@a:1", []string{HavePath}, ""},
		{"ftp://a:1", []string{HavePath}, ""},
	} {
		got, err := JoinURL(tc.base, tc.elem...)
		if tc.want == "" {
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("JoinURL(%q, %q) = %q, %v; want ErrInvalidArgument", tc.base, tc.elem, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("JoinURL(%q, %q) = %q, %v; want %q", tc.base, tc.elem, got, err, tc.want)
		}
	}
}
