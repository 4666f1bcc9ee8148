package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// Containers reads this node's containers from its containerd: the source
// side of coop migrate.
type Containers struct {
	client *containerd.Client
}

var _ peers.ContainerRecords = (*Containers)(nil)

// NewContainers connects to containerd at address (lazily: containerd may
// start after coop, since coop is its content store).
func NewContainers(address string) (*Containers, error) {
	c, err := containerd.New(address)
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", address, err)
	}
	return &Containers{client: c}, nil
}

// Close closes the containerd connection.
func (c *Containers) Close() error { return c.client.Close() }

// Ping asks containerd its version: nil when it answers.
func (c *Containers) Ping(ctx context.Context) error {
	_, err := c.client.Version(ctx)
	return err
}

// BuiltinContent says whether containerd runs its own content store
// (io.containerd.content.v1.content, loaded): it then does not use coop's
// (proxy mode needs it disabled, as coop containerd-config does).
func (c *Containers) BuiltinContent(ctx context.Context) (bool, error) {
	resp, err := c.client.IntrospectionService().Plugins(ctx, "type=="+builtinContentType)
	if err != nil {
		return false, err
	}
	for _, p := range resp.Plugins {
		if p.Type == builtinContentType && p.ID == "content" && p.InitErr == nil {
			return true, nil
		}
	}
	return false, nil
}

// builtinContentType is the plugin type of content stores.
const builtinContentType = "io.containerd.content.v1"

// Record returns the record of container id in namespace ns.
func (c *Containers) Record(ctx context.Context, ns, id string) (*peers.ContainerRecord, error) {
	if err := identifiers.Validate(ns); err != nil {
		return nil, fmt.Errorf("namespace %q: %w", ns, errdefs.ErrInvalidArgument)
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	ctr, err := c.client.LoadContainer(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("container %s/%s: %w", ns, id, err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("container %s/%s: %w", ns, id, err)
	}
	if info.Image == "" {
		return nil, fmt.Errorf("container %s/%s has no image: %w", ns, id, errdefs.ErrFailedPrecondition)
	}
	img, err := c.client.GetImage(ctx, info.Image)
	if err != nil {
		return nil, fmt.Errorf("container %s/%s: image %s: %w", ns, id, info.Image, err)
	}
	spec, err := ctr.Spec(ctx)
	if err != nil {
		return nil, fmt.Errorf("container %s/%s: spec: %w", ns, id, err)
	}
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	rec := &peers.ContainerRecord{
		Namespace:   ns,
		ID:          id,
		Image:       info.Image,
		Target:      img.Target(),
		Spec:        specJSON,
		Snapshotter: info.Snapshotter,
		Labels:      info.Labels,
		Runtime:     info.Runtime.Name,
	}
	if task, err := ctr.Task(ctx, nil); err == nil {
		if st, err := task.Status(ctx); err == nil {
			rec.Running = st.Status == containerd.Running
		}
	}
	return rec, nil
}

// stopGrace is how long a task has to exit after SIGTERM before SIGKILL (a
// process running as PID 1 without a handler ignores SIGTERM).
const stopGrace = 5 * time.Second

// Stop stops the container's task: SIGTERM, then SIGKILL after stopGrace,
// and deletes the task. A container with no task is already stopped.
func (c *Containers) Stop(ctx context.Context, ns, id string) error {
	if err := identifiers.Validate(ns); err != nil {
		return fmt.Errorf("namespace %q: %w", ns, errdefs.ErrInvalidArgument)
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	ctr, err := c.client.LoadContainer(ctx, id)
	if err != nil {
		return fmt.Errorf("container %s/%s: %w", ns, id, err)
	}
	task, err := ctr.Task(ctx, nil)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("container %s/%s: task: %w", ns, id, err)
	}
	exited, err := task.Wait(ctx)
	if err != nil {
		return fmt.Errorf("container %s/%s: wait: %w", ns, id, err)
	}
	if err := task.Kill(ctx, syscall.SIGTERM); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("container %s/%s: kill: %w", ns, id, err)
	}
	select {
	case <-exited:
	case <-time.After(stopGrace):
		log.G(ctx).WithField("container", id).Warn("no exit after SIGTERM; sending SIGKILL")
		if err := task.Kill(ctx, syscall.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("container %s/%s: kill: %w", ns, id, err)
		}
		<-exited
	case <-ctx.Done():
		return ctx.Err()
	}
	if _, err := task.Delete(ctx); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("container %s/%s: delete task: %w", ns, id, err)
	}
	log.G(ctx).WithField("container", ns+"/"+id).Info("container stopped for a migration")
	return nil
}

// Forget removes containerd's records of dgst in every namespace: a claimed
// blob that could not be fetched, which containerd would otherwise take as
// present and never fetch again (content.RecordCleaner).
func (c *Containers) Forget(ctx context.Context, dgst digest.Digest) error {
	nss, err := c.client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("list containerd namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		err := c.client.ContentStore().Delete(namespaces.WithNamespace(ctx, ns), dgst)
		switch {
		case err == nil:
			log.G(ctx).WithField("namespace", ns).WithField("digest", dgst).Info("containerd forgot a blob coop could not fetch")
		case !errdefs.IsNotFound(err):
			errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
		}
	}
	return errors.Join(errs...)
}
