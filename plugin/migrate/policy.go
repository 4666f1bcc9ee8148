package migrate

// What a migration may recreate. The source sends a whole OCI runtime spec
// and runtime name; the destination's containerd would run whatever they
// say, as root. Unless Options.AllowPrivileged (coop migrate
// --allow-privileged), a migration recreates only a container that asks for
// nothing beyond what this node's containerd gives a new container by
// default: oci.GenerateSpec's Linux spec with oci.WithDefaultUnixDevices
// (what `ctr run` starts from), measured by DefaultSpec. Refused:
//
//   - capabilities outside the default set, in any of the bounding,
//     effective, permitted, inheritable or ambient sets;
//   - noNewPrivileges false where the default sets it;
//   - an AppArmor profile other than the default's, no seccomp profile where
//     the default has one, and a seccomp listener (a socket of this host);
//   - host namespaces: a namespace of the default's types missing, and any
//     namespace joined by path (CRI's pod containers join their sandbox's,
//     so they are refused: pods move through their controller);
//   - mounts other than the default's own (same destination, type, source
//     and options), a tmpfs, or a read-only cgroup filesystem at
//     /sys/fs/cgroup. Bind mounts name paths of this host and are always
//     refused, including the /etc/hosts, /etc/resolv.conf and /etc/hostname
//     that CRI and nerdctl bind from their per-container state directories:
//     those files are the source's and do not exist here;
//   - paths the default masks or makes read-only that the spec does not;
//   - device nodes beyond the default's, device cgroup rules that allow more
//     than the default's (which begin by denying every device), and host
//     network devices moved into the container;
//   - hooks (they run on this host), a root filesystem other than the
//     snapshot's, a VM section (hypervisor and kernel paths of this host),
//     and a runtime named by a path rather than a name.
//
// Not judged, since they grant nothing outside the container's own
// namespaces: the process, its user, environment and rlimits, cgroup
// resource limits, sysctls (runc refuses those outside the container's
// namespaces), SELinux labels, annotations and labels.

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// DefaultSpec returns the spec this node's containerd gives a new Linux
// container id in ctx's namespace: oci's default with its default devices.
// CheckSpec measures a migrated spec against it. It needs no containerd.
func DefaultSpec(ctx context.Context, id string) (*oci.Spec, error) {
	return oci.GenerateSpecWithPlatform(ctx, nil, "linux/"+runtime.GOARCH, &containers.Container{ID: id}, oci.WithDefaultUnixDevices)
}

// CheckSpec returns nil when spec asks for nothing beyond def (DefaultSpec),
// by the rules above; otherwise an error of class errdefs.ErrPermissionDenied
// that names everything refused.
func CheckSpec(spec, def *oci.Spec) error {
	if r := Refusals(spec, def); len(r) > 0 {
		return fmt.Errorf("the container's spec asks for more than a new container gets here (allow with --allow-privileged): %s: %w",
			strings.Join(r, "; "), errdefs.ErrPermissionDenied)
	}
	return nil
}

// CheckRuntime returns an error of class errdefs.ErrPermissionDenied when
// name is not a runtime name (io.containerd.runc.v2) but a path, which
// containerd would run as the shim.
func CheckRuntime(name string) error {
	if strings.ContainsAny(name, `/\`) {
		return fmt.Errorf("runtime %q is a path, not a runtime name (allow with --allow-privileged): %w", name, errdefs.ErrPermissionDenied)
	}
	return nil
}

// Refusals lists, one phrase each, what spec asks for beyond def; nil when
// nothing.
func Refusals(spec, def *oci.Spec) []string {
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	proc, defProc := spec.Process, def.Process
	if proc == nil {
		proc = &specs.Process{}
	}
	if defProc == nil {
		defProc = &specs.Process{}
	}
	out = append(out, capabilityRefusals(proc.Capabilities, defProc.Capabilities)...)
	if defProc.NoNewPrivileges && !proc.NoNewPrivileges {
		add("new privileges (noNewPrivileges false)")
	}
	if defProc.ApparmorProfile != "" && proc.ApparmorProfile != defProc.ApparmorProfile {
		add("AppArmor profile %q instead of %q", proc.ApparmorProfile, defProc.ApparmorProfile)
	}

	lin, defLin := spec.Linux, def.Linux
	if lin == nil {
		lin = &specs.Linux{}
	}
	if defLin == nil {
		defLin = &specs.Linux{}
	}
	if defLin.Seccomp != nil && lin.Seccomp == nil {
		add("no seccomp profile")
	}
	if lin.Seccomp != nil && lin.Seccomp.ListenerPath != "" {
		add("seccomp listener %s", lin.Seccomp.ListenerPath)
	}
	out = append(out, namespaceRefusals(lin.Namespaces, defLin.Namespaces)...)
	out = append(out, mountRefusals(spec.Mounts, def.Mounts)...)
	var unmasked, writable, netDevs, hooks []string
	for _, p := range defLin.MaskedPaths {
		// The default masks one thermal_throttle directory per CPU of the
		// host it was made on: the source's CPUs are not this node's.
		if !strings.HasPrefix(p, "/sys/devices/system/cpu/") && !slices.Contains(lin.MaskedPaths, p) {
			unmasked = append(unmasked, p)
		}
	}
	for _, p := range defLin.ReadonlyPaths {
		if !slices.Contains(lin.ReadonlyPaths, p) {
			writable = append(writable, p)
		}
	}
	for name := range lin.NetDevices {
		netDevs = append(netDevs, name)
	}
	if h := spec.Hooks; h != nil {
		for kind, hs := range map[string][]specs.Hook{
			"prestart": h.Prestart, "createRuntime": h.CreateRuntime, "createContainer": h.CreateContainer, //nolint:staticcheck // Prestart is deprecated, not gone
			"startContainer": h.StartContainer, "poststart": h.Poststart, "poststop": h.Poststop,
		} {
			for _, hk := range hs {
				hooks = append(hooks, kind+" "+hk.Path)
			}
		}
	}
	out = appendAll(out, "unmasked paths", unmasked)
	out = appendAll(out, "writable paths", writable)
	out = append(out, deviceRefusals(lin, defLin)...)
	out = appendList(out, "host network devices", netDevs)
	out = appendList(out, "hooks (run on this host)", hooks)
	if spec.Root != nil && def.Root != nil && spec.Root.Path != def.Root.Path {
		add("root filesystem %s instead of the snapshot", spec.Root.Path)
	}
	if spec.VM != nil {
		add("a VM section (hypervisor and kernel of this host)")
	}
	sort.Strings(out)
	return out
}

// maxListed is how many items of one kind a refusal names.
const maxListed = 8

// appendList appends "what a, b, c" to out when items is not empty, in
// order, naming at most maxListed of them.
func appendList(out []string, what string, items []string) []string {
	return appendSome(out, what, items, maxListed)
}

// appendAll is appendList naming all items: lists with a known bound
// (masked paths) whose every item matters.
func appendAll(out []string, what string, items []string) []string {
	return appendSome(out, what, items, len(items))
}

func appendSome(out []string, what string, items []string, most int) []string {
	if len(items) == 0 {
		return out
	}
	items = slices.Clone(items)
	sort.Strings(items)
	s := what + " " + strings.Join(items[:min(len(items), most)], ", ")
	if len(items) > most {
		s += fmt.Sprintf(" and %d more", len(items)-most)
	}
	return append(out, s)
}

// capabilityRefusals names the capabilities outside def's sets, grouped
// by the sets of spec that hold them (all of them: each one matters).
func capabilityRefusals(caps, def *specs.LinuxCapabilities) []string {
	if caps == nil {
		return nil
	}
	allowed := map[string]bool{}
	if def != nil {
		for _, set := range [][]string{def.Bounding, def.Effective, def.Permitted, def.Inheritable, def.Ambient} {
			for _, c := range set {
				allowed[c] = true
			}
		}
	}
	extra := map[string][]string{}
	for _, set := range []struct {
		name string
		caps []string
	}{
		{"bounding", caps.Bounding}, {"effective", caps.Effective}, {"permitted", caps.Permitted},
		{"inheritable", caps.Inheritable}, {"ambient", caps.Ambient},
	} {
		for _, c := range set.caps {
			if !allowed[c] && !slices.Contains(extra[c], set.name) {
				extra[c] = append(extra[c], set.name)
			}
		}
	}
	bySets := map[string][]string{}
	for c, sets := range extra {
		k := strings.Join(sets, ", ")
		bySets[k] = append(bySets[k], c)
	}
	var out []string
	for sets, cs := range bySets {
		sort.Strings(cs)
		out = append(out, fmt.Sprintf("capabilities %s (%s)", strings.Join(cs, ", "), sets))
	}
	return out
}

// namespaceRefusals names each of def's namespace types spec does not have
// as a new namespace, and each namespace spec joins by path.
func namespaceRefusals(nss, def []specs.LinuxNamespace) []string {
	var out []string
	for _, d := range def {
		if !slices.ContainsFunc(nss, func(n specs.LinuxNamespace) bool { return n.Type == d.Type }) {
			out = append(out, fmt.Sprintf("host %s namespace", d.Type))
		}
	}
	for _, n := range nss {
		if n.Path != "" {
			out = append(out, fmt.Sprintf("%s namespace joined at %s", n.Type, n.Path))
		}
	}
	return out
}

// mountRefusals names the mounts that are not one of def's, a tmpfs or a
// read-only cgroup filesystem at /sys/fs/cgroup.
func mountRefusals(mounts, def []specs.Mount) []string {
	var binds, others []string
	for _, m := range mounts {
		bind := m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
		switch {
		case bind:
			binds = append(binds, fmt.Sprintf("%s at %s", m.Source, m.Destination))
		case slices.ContainsFunc(def, func(d specs.Mount) bool { return sameMount(m, d) }):
		case m.Type == "tmpfs":
		case (m.Type == "cgroup" || m.Type == "cgroup2") && m.Destination == "/sys/fs/cgroup" && slices.Contains(m.Options, "ro"):
		default:
			others = append(others, fmt.Sprintf("%s of %s at %s with options %v", m.Type, m.Source, m.Destination, m.Options))
		}
	}
	out := appendList(nil, "bind mounts of host paths", binds)
	return appendList(out, "mounts", others)
}

func sameMount(a, b specs.Mount) bool {
	if a.Destination != b.Destination || a.Type != b.Type || a.Source != b.Source || len(a.Options) != len(b.Options) {
		return false
	}
	x, y := slices.Clone(a.Options), slices.Clone(b.Options)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y) && len(a.UIDMappings) == 0 && len(a.GIDMappings) == 0
}

// deviceRefusals names device nodes beyond def's and device cgroup rules
// that allow more than def's.
func deviceRefusals(lin, def *specs.Linux) []string {
	var out, nodes, allowed []string
	for _, d := range lin.Devices {
		if !slices.ContainsFunc(def.Devices, func(x specs.LinuxDevice) bool {
			return x.Path == d.Path && x.Type == d.Type && x.Major == d.Major && x.Minor == d.Minor
		}) {
			nodes = append(nodes, fmt.Sprintf("%s (%s %d:%d)", d.Path, d.Type, d.Major, d.Minor))
		}
	}
	var rules, defRules []specs.LinuxDeviceCgroup
	if lin.Resources != nil {
		rules = lin.Resources.Devices
	}
	if def.Resources != nil {
		defRules = def.Resources.Devices
	}
	// The default begins by denying every device; without that rule, the
	// rules that follow allow on top of everything.
	if len(defRules) > 0 && !defRules[0].Allow && (len(rules) == 0 || !sameRule(rules[0], defRules[0])) {
		out = append(out, "device cgroup rules that do not begin by denying every device")
	}
	for _, r := range rules {
		if r.Allow && !slices.ContainsFunc(defRules, func(d specs.LinuxDeviceCgroup) bool { return d.Allow && sameRule(r, d) }) {
			allowed = append(allowed, ruleString(r))
		}
	}
	out = appendList(out, "device nodes", nodes)
	return appendList(out, "device cgroup rules allowing", allowed)
}

func sameRule(a, b specs.LinuxDeviceCgroup) bool {
	eq := func(x, y *int64) bool { return (x == nil) == (y == nil) && (x == nil || *x == *y) }
	return a.Allow == b.Allow && normType(a.Type) == normType(b.Type) && eq(a.Major, b.Major) && eq(a.Minor, b.Minor) && a.Access == b.Access
}

// normType reads an empty device type as all devices, as runc does.
func normType(t string) string {
	if t == "" {
		return "a"
	}
	return t
}

func ruleString(r specs.LinuxDeviceCgroup) string {
	n := func(x *int64) string {
		if x == nil {
			return "*"
		}
		return fmt.Sprint(*x)
	}
	return fmt.Sprintf("%s %s:%s %s", normType(r.Type), n(r.Major), n(r.Minor), r.Access)
}
