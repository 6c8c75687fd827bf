# Today's driver with what this executor cannot do: a guest agent, another
# emulator, a dynamic port and a template. Each is refused with its line.
job "unsupported" {
  datacenters = ["dc1"]

  group "vm" {
    network {
      port "ssh" {}
    }

    task "virtual" {
      driver = "qemu"

      artifact {
        source = "https://internal.file.server/linux.img"

        options {
          checksum = "md5:df6a4178aec9fbdc1d6d7e3634d1bc33"
        }
      }

      template {
        data        = "hostname: {{ env \"NOMAD_ALLOC_ID\" }}"
        destination = "local/user-data"
      }

      config {
        image_path  = "local/linux.img"
        guest_agent = true
        emulator    = "qemu-system-aarch64"

        port_map {
          ssh = 22
        }
      }
    }
  }
}
