package resolver

import "testing"

func TestToken(t *testing.T) {
	for in, want := range map[string]string{
		"node-1":              "node-1",
		"ip-10-0-0-1.ec2.int": "ip-10-0-0-1=2Eec2=2Eint",
		"a*b>c d":             "a=2Ab=3Ec=20d",
		"x=y":                 "x=3Dy",
	} {
		if got := Token(in); got != want {
			t.Errorf("Token(%q) = %q, want %q", in, got, want)
		}
	}
}
