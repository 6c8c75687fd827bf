# Today's qemu driver, as its documentation shows it: the image is an
# artifact fetched into the task directory and checked against its
# checksum option, image_path names it, and port_map forwards the
# group's static ports to guest ports.
job "example" {
  datacenters = ["dc1"]
  type        = "service"

  group "vm" {
    count = 1

    network {
      port "ssh" {
        static = 2222
      }
      port "http" {
        static = 8080
      }
    }

    service {
      name = "linux-web"
      port = "http"

      check {
        type     = "http"
        path     = "/"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "25s"
      mode     = "delay"
    }

    task "virtual" {
      driver = "qemu"

      artifact {
        source      = "https://internal.file.server/linux.img"
        destination = "local/linux.img"
        mode        = "file"

        options {
          checksum = "md5:df6a4178aec9fbdc1d6d7e3634d1bc33"
        }
      }

      config {
        image_path        = "local/linux.img"
        accelerator       = "kvm"
        graceful_shutdown = true
        args              = ["-nodefaults", "-nodefconfig"]

        port_map {
          ssh  = 22
          http = 8080
        }
      }

      kill_timeout = "30s"

      resources {
        cores  = 2
        memory = 1024
      }
    }
  }
}
