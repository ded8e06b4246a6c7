"""Checks the Kubernetes manifests in deploy/kubernetes (run by tests/it/deploy.rs).

Parses every YAML document and checks what the API server and kubelet would
reject, and what the team requires of every pod: names and kinds, selectors
that match their templates, an image and resources on every container, a
non-root security context (root only in an init container that drops
everything but named capabilities), probes on the broker's health endpoints
pointing at a declared port, and a socket directory shared by the broker
and its clients. Prints, as JSON, what the Rust test checks further: each
broker container's args and each embedded tokenbroker.toml.

usage: check_manifests.py DIR
"""

import json
import pathlib
import sys
import tomllib

import yaml

POD_OWNERS = {"DaemonSet", "Deployment", "StatefulSet", "Job"}
API_VERSIONS = {
    "Namespace": "v1", "ServiceAccount": "v1", "ConfigMap": "v1", "Pod": "v1",
    "DaemonSet": "apps/v1", "Deployment": "apps/v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
}
SOCKET_DIR = "/run/tokenbroker"

errors = []


def check(condition, where, message):
    if not condition:
        errors.append(f"{where}: {message}")
    return condition


def pod_spec(doc):
    if doc["kind"] == "Pod":
        return doc.get("spec", {})
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def non_root(pod_security, container_security):
    run_as_non_root = container_security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    uid = container_security.get("runAsUser", pod_security.get("runAsUser"))
    return run_as_non_root is True and uid not in (None, 0)


def check_container(where, container, pod_security, ports_required, init=False):
    name = container.get("name")
    where = f"{where} container {name}"
    check(bool(name), where, "has no name")
    check(bool(container.get("image")), where, "has no image")
    resources = container.get("resources", {})
    check("memory" in resources.get("requests", {}), where, "has no memory request")
    check("cpu" in resources.get("requests", {}), where, "has no cpu request")
    check("memory" in resources.get("limits", {}), where, "has no memory limit")
    security = container.get("securityContext", {})
    check(security.get("allowPrivilegeEscalation") is False, where, "must set allowPrivilegeEscalation: false")
    check(security.get("readOnlyRootFilesystem") is True, where, "must set readOnlyRootFilesystem: true")
    capabilities = security.get("capabilities", {})
    check(capabilities.get("drop") == ["ALL"], where, "must drop ALL capabilities")
    if init and security.get("runAsUser") == 0:
        check(set(capabilities.get("add", [])) <= {"CHOWN", "FOWNER"}, where,
              "a root init container may only add CHOWN and FOWNER")
    else:
        check(non_root(pod_security, security), where, "must run as non-root (runAsNonRoot and a non-zero runAsUser)")
        check(not capabilities.get("add"), where, "must not add capabilities")
    port_names = {p.get("name") for p in container.get("ports", [])}
    port_numbers = {p.get("containerPort") for p in container.get("ports", [])}
    for probe_name, path in ports_required:
        probe = container.get(probe_name)
        if not check(probe is not None, where, f"has no {probe_name}"):
            continue
        http = probe.get("httpGet", {})
        check(http.get("path") == path, where, f"{probe_name} must GET {path}")
        check(http.get("port") in port_names | port_numbers, where,
              f"{probe_name} port {http.get('port')!r} is not a declared containerPort")


def main(directory):
    summary = {"brokers": [], "configs": [], "kinds": [], "socket_mounts": [],
               "cluster_roles": [], "workload_identity": []}
    files = sorted(pathlib.Path(directory).glob("*.yaml"))
    check(bool(files), directory, "no manifests")
    configmaps = {}
    for path in files:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            kind = doc.get("kind")
            name = doc.get("metadata", {}).get("name")
            where = f"{path.name}[{index}] {kind}/{name}"
            check(bool(kind) and bool(name), where, "needs kind and metadata.name")
            if kind in API_VERSIONS:
                check(doc.get("apiVersion") == API_VERSIONS[kind], where,
                      f"apiVersion must be {API_VERSIONS[kind]}")
            summary["kinds"].append(kind)
            if kind == "ClusterRole":
                # Workload identity reads pods and service accounts, and
                # nothing else.
                rules = doc.get("rules", [])
                granted = {(group, resource, verb) for rule in rules
                           for group in rule.get("apiGroups", [])
                           for resource in rule.get("resources", [])
                           for verb in rule.get("verbs", [])}
                wanted = {("", resource, verb) for resource in ("pods", "serviceaccounts")
                          for verb in ("get", "list", "watch")}
                check(granted == wanted, where,
                      f"must grant exactly get/list/watch on pods and serviceaccounts, grants {sorted(granted)}")
                summary["cluster_roles"].append(name)
            if kind == "ConfigMap":
                configmaps[name] = doc.get("data", {})
                if "tokenbroker.toml" in doc.get("data", {}):
                    summary["configs"].append(doc["data"]["tokenbroker.toml"])
            if kind not in POD_OWNERS | {"Pod"}:
                continue
            if kind in POD_OWNERS:
                selector = doc["spec"].get("selector", {}).get("matchLabels", {})
                labels = doc["spec"].get("template", {}).get("metadata", {}).get("labels", {})
                check(bool(selector) and selector.items() <= labels.items(), where,
                      "spec.selector.matchLabels must match the template's labels")
            spec = pod_spec(doc)
            pod_security = spec.get("securityContext", {})
            check(pod_security.get("runAsNonRoot") is True, where, "pod securityContext needs runAsNonRoot: true")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            check(bool(spec.get("containers")), where, "has no containers")
            for container in spec.get("initContainers", []):
                restartable = container.get("restartPolicy") == "Always"
                check_container(where, container, pod_security, [], init=not restartable)
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                for mount in container.get("volumeMounts", []):
                    volume = volumes.get(mount["name"])
                    check(volume is not None, where, f"mounts undeclared volume {mount['name']}")
                    if volume and "configMap" in volume:
                        check(volume["configMap"]["name"] in configmaps, where,
                              f"configMap {volume['configMap']['name']} is not defined")
                    if volume and mount["mountPath"] == SOCKET_DIR:
                        summary["socket_mounts"].append(
                            {"kind": kind, "volume": volume, "readOnly": mount.get("readOnly", False)})
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                if container.get("args", [])[:1] == ["serve"]:
                    config = next((configmaps.get(v["configMap"]["name"], {}).get("tokenbroker.toml", "")
                                   for v in volumes.values() if "configMap" in v), "")
                    summary["brokers"].append({"args": container["args"], "config": config})
                    if tomllib.loads(config).get("workload_identity") == "kubernetes":
                        # Pods' pids are visible only in the host's pid
                        # namespace; the node's name selects its pods.
                        check(spec.get("hostPID") is True, where, "workload identity needs hostPID: true")
                        node = [e for e in container.get("env", []) if e["name"] == "TOKENBROKER_NODE_NAME"]
                        check(bool(node) and node[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
                              where, "TOKENBROKER_NODE_NAME must come from the downward API's spec.nodeName")
                        check(spec.get("automountServiceAccountToken") is not False, where,
                              "workload identity reads the API with the pod's service-account token")
                        summary["workload_identity"].append(name)
            for container in spec.get("containers", []):
                args = container.get("args", [])
                is_broker = args[:1] == ["serve"]
                probes = [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] if is_broker and kind == "DaemonSet" else []
                check_container(where, container, pod_security, probes)
    check("DaemonSet" in summary["kinds"], directory, "no DaemonSet")
    host_paths = {m["volume"].get("hostPath", {}).get("path") for m in summary["socket_mounts"]
                  if "hostPath" in m["volume"]}
    check(host_paths == {SOCKET_DIR}, directory,
          f"broker and clients must share the hostPath {SOCKET_DIR}, found {host_paths}")
    check(any(m["kind"] == "Pod" for m in summary["socket_mounts"]), directory,
          "no example client pod mounts the socket directory")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
