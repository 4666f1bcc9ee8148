package migrate

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestCheckSpec: the default spec with one change each; a change that
// grants more than a new container gets is refused and named.
func TestCheckSpec(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "default")
	i64 := func(i int64) *int64 { return &i }
	for _, tc := range []struct {
		name string
		// opts change the spec the source sends.
		opts []oci.SpecOpts
		// def changes the default (for what containerd's has not).
		def func(*oci.Spec)
		// refused is a phrase of the error; empty: allowed.
		refused []string
	}{
		{name: "the default"},
		{name: "ctr run's own changes", opts: []oci.SpecOpts{
			oci.WithProcessArgs("/bin/busybox", "httpd", "-f"), oci.WithEnv([]string{"A=1"}), oci.WithProcessCwd("/srv"),
			oci.WithUIDGID(1000, 1000), oci.WithCgroup("/a-web"), oci.WithHostname("web"), oci.WithMemoryLimit(1 << 30),
		}},
		{name: "fewer capabilities", opts: []oci.SpecOpts{oci.WithCapabilities([]string{"CAP_CHOWN"})}},
		{name: "a user namespace", opts: []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.UserNamespace}),
			oci.WithUserNamespace([]specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}}, []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}})}},
		{name: "a cgroup namespace", opts: []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.CgroupNamespace})}},
		{name: "a seccomp profile", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActErrno}
			return nil
		}}},
		{name: "a tmpfs", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/cache", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "size=1m"}}})}},
		{name: "a read-only cgroup filesystem", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"ro", "nosuid", "noexec", "nodev"}}})}},
		{name: "default mounts in another option order", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			for i := range s.Mounts {
				o := s.Mounts[i].Options
				for a, b := 0, len(o)-1; a < b; a, b = a+1, b-1 {
					o[a], o[b] = o[b], o[a]
				}
			}
			return nil
		}}},
		{name: "masked paths of other CPUs", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			var kept []string
			for _, p := range s.Linux.MaskedPaths {
				if !strings.HasPrefix(p, "/sys/devices/system/cpu/") {
					kept = append(kept, p)
				}
			}
			kept = append(kept, "/sys/devices/system/cpu/cpu99/thermal_throttle", "/proc/extra")
			s.Linux.MaskedPaths = kept
			return nil
		}}},
		{name: "a device cgroup rule removed", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Resources.Devices = s.Linux.Resources.Devices[:3]
			return nil
		}}},

		{name: "privileged", opts: []oci.SpecOpts{oci.WithPrivileged, oci.WithAddedCapabilities([]string{"CAP_SYS_ADMIN"})},
			refused: []string{"CAP_SYS_ADMIN", "(bounding, effective, permitted)", "unmasked paths /proc/acpi", "/proc/kcore", "writable paths /proc/bus", "mounts sysfs of sysfs at /sys"}},
		{name: "an added capability", opts: []oci.SpecOpts{oci.WithAddedCapabilities([]string{"CAP_NET_ADMIN"})},
			refused: []string{"capabilities CAP_NET_ADMIN (bounding, effective, permitted)"}},
		{name: "an ambient capability", opts: []oci.SpecOpts{oci.WithAmbientCapabilities([]string{"CAP_SYS_PTRACE"})},
			refused: []string{"capabilities CAP_SYS_PTRACE (inheritable, ambient)"}},
		{name: "an inheritable capability", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Process.Capabilities.Inheritable = []string{"CAP_SYS_MODULE"}
			return nil
		}}, refused: []string{"capabilities CAP_SYS_MODULE (inheritable)"}},
		{name: "new privileges", opts: []oci.SpecOpts{oci.WithNewPrivileges}, refused: []string{"noNewPrivileges false"}},
		{name: "host network", opts: []oci.SpecOpts{oci.WithHostNamespace(specs.NetworkNamespace)}, refused: []string{"host network namespace"}},
		{name: "host pid", opts: []oci.SpecOpts{oci.WithHostNamespace(specs.PIDNamespace)}, refused: []string{"host pid namespace"}},
		{name: "host ipc, uts and mount", opts: []oci.SpecOpts{oci.WithHostNamespace(specs.IPCNamespace), oci.WithHostNamespace(specs.UTSNamespace), oci.WithHostNamespace(specs.MountNamespace)},
			refused: []string{"host ipc namespace", "host uts namespace", "host mount namespace"}},
		{name: "a namespace joined by path", opts: []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/proc/1/ns/net"})},
			refused: []string{"network namespace joined at /proc/1/ns/net"}},
		{name: "a user namespace joined by path", opts: []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.UserNamespace, Path: "/proc/1/ns/user"})},
			refused: []string{"user namespace joined at /proc/1/ns/user"}},
		{name: "a bind mount", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/host", Type: "bind", Source: "/", Options: []string{"rbind", "rw"}}})},
			refused: []string{"bind mounts of host paths / at /host"}},
		{name: "an rbind option on another type", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/data", Type: "none", Source: "/var/lib", Options: []string{"rbind"}}})},
			refused: []string{"bind mounts of host paths /var/lib at /data"}},
		{name: "a bind as tmpfs", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/etc/shadow", Type: "tmpfs", Source: "/etc/shadow", Options: []string{"bind", "ro"}}})},
			refused: []string{"bind mounts of host paths /etc/shadow at /etc/shadow"}},
		{name: "the host's resolv.conf", opts: []oci.SpecOpts{oci.WithHostResolvconf},
			refused: []string{"bind mounts of host paths /etc/resolv.conf at /etc/resolv.conf"}},
		{name: "an overlay of host paths", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/x", Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/etc"}}})},
			refused: []string{"mounts overlay of overlay at /x"}},
		{name: "a writable sysfs", opts: []oci.SpecOpts{oci.WithWriteableSysfs}, refused: []string{"mounts sysfs of sysfs at /sys with options [nosuid noexec nodev rw]"}},
		{name: "a writable cgroup filesystem", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{Destination: "/sys/fs/cgroup", Type: "cgroup2", Source: "cgroup", Options: []string{"rw"}}})},
			refused: []string{"mounts cgroup2 of cgroup at /sys/fs/cgroup"}},
		{name: "no masked paths", opts: []oci.SpecOpts{oci.WithMaskedPaths(nil)}, refused: []string{"unmasked paths /proc/acpi, /proc/asound", "/proc/kcore", "/sys/firmware"}},
		{name: "no read-only paths", opts: []oci.SpecOpts{oci.WithReadonlyPaths(nil)}, refused: []string{"writable paths /proc/bus, /proc/fs, /proc/irq, /proc/sys, /proc/sysrq-trigger"}},
		{name: "many device nodes", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			for i := range 20 {
				s.Linux.Devices = append(s.Linux.Devices, specs.LinuxDevice{Path: fmt.Sprintf("/dev/tty%02d", i), Type: "c", Major: 4, Minor: int64(i)})
			}
			return nil
		}}, refused: []string{"device nodes /dev/tty00 (c 4:0), ", "/dev/tty07 (c 4:7) and 12 more"}},
		{name: "a device node", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Devices = append(s.Linux.Devices, specs.LinuxDevice{Path: "/dev/sda", Type: "b", Major: 8})
			return nil
		}}, refused: []string{"device nodes /dev/sda (b 8:0)"}},
		{name: "all devices allowed", opts: []oci.SpecOpts{oci.WithAllDevicesAllowed},
			refused: []string{"device cgroup rules that do not begin by denying every device", "device cgroup rules allowing a *:* rwm"}},
		{name: "a block device allowed", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Resources.Devices = append(s.Linux.Resources.Devices, specs.LinuxDeviceCgroup{Allow: true, Type: "b", Major: i64(8), Access: "rwm"})
			return nil
		}}, refused: []string{"device cgroup rules allowing b 8:* rwm"}},
		{name: "no device cgroup rules", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Resources = nil
			return nil
		}}, refused: []string{"device cgroup rules that do not begin by denying every device"}},
		{name: "a host network device", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.NetDevices = map[string]specs.LinuxNetDevice{"eth0": {}}
			return nil
		}}, refused: []string{"host network devices eth0"}},
		{name: "a hook", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "id"}}}}
			return nil
		}}, refused: []string{"hooks (run on this host) createRuntime /bin/sh"}},
		{name: "the host's root", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Root.Path = "/"
			return nil
		}}, refused: []string{"root filesystem / instead of the snapshot"}},
		{name: "a VM", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.VM = &specs.VM{Hypervisor: specs.VMHypervisor{Path: "/tmp/x"}}
			return nil
		}}, refused: []string{"a VM section"}},
		{name: "a seccomp listener", opts: []oci.SpecOpts{func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
			s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, ListenerPath: "/run/agent.sock"}
			return nil
		}}, refused: []string{"seccomp listener /run/agent.sock"}},
		{name: "no seccomp where the default has one", def: func(s *oci.Spec) { s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActErrno} },
			refused: []string{"no seccomp profile"}},
		{name: "unconfined where the default has an AppArmor profile", opts: []oci.SpecOpts{oci.WithApparmorProfile("unconfined")},
			def: func(s *oci.Spec) { s.Process.ApparmorProfile = "cri-containerd.apparmor.d" }, refused: []string{`AppArmor profile "unconfined" instead of "cri-containerd.apparmor.d"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			def, err := DefaultSpec(ctx, "web")
			if err != nil {
				t.Fatal(err)
			}
			if tc.def != nil {
				tc.def(def)
			}
			spec, err := DefaultSpec(ctx, "web")
			if err != nil {
				t.Fatal(err)
			}
			if err := oci.ApplyOpts(ctx, nil, &containers.Container{ID: "web"}, spec, tc.opts...); err != nil {
				t.Fatal(err)
			}
			err = CheckSpec(spec, def)
			if len(tc.refused) == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errdefs.IsPermissionDenied(err) {
				t.Fatalf("err %v, want permission denied", err)
			}
			for _, want := range tc.refused {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not name %q: %v", want, err)
				}
			}
		})
	}
}

func TestCheckRuntime(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"io.containerd.runc.v2", true},
		{"io.containerd.runsc.v1", true},
		{"/tmp/shim", false},
		{"io.containerd.x/../../tmp/y.v1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckRuntime(tc.name)
			if tc.ok != (err == nil) || (err != nil && !errdefs.IsPermissionDenied(err)) {
				t.Fatalf("err %v, want ok %v", err, tc.ok)
			}
		})
	}
}
